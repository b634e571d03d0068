"""Submit a job to a Ray cluster the way a user does (`ray job submit`), wait for it, read its logs.

Submission goes through the `ray job submit` CLI itself, so what is tested is what users run;
status and logs come from the dashboard's job REST API (`JobSubmissionClient`) with the
cluster's bearer token, which works whatever the auth mode of the calling process.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

log = logging.getLogger(__name__)

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class JobFailed(RuntimeError):
    """The job ended in FAILED or STOPPED, or did not end in time; the message ends with its logs."""


class JobClient:
    def __init__(self, dashboard_url: str, token_file: str | None = None, ray_bin: str | None = None):
        self.dashboard_url = dashboard_url
        self.token_file = token_file
        self.ray_bin = ray_bin or str(Path(sys.executable).with_name("ray"))
        self._sdk = None

    @property
    def sdk(self):
        if self._sdk is None:
            from ray.job_submission import JobSubmissionClient

            headers = {}
            if self.token_file:
                headers["Authorization"] = f"Bearer {Path(self.token_file).read_text().strip()}"
            self._sdk = JobSubmissionClient(self.dashboard_url, headers=headers)
        return self._sdk

    def cli_env(self) -> dict[str, str]:
        env = dict(os.environ, RAY_ADDRESS=self.dashboard_url)
        if self.token_file:
            env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=self.token_file)
        return env

    def submit(
        self,
        entrypoint: list[str],
        working_dir: str | Path = ".",
        runtime_env_json: str | None = None,
        submission_id: str | None = None,
    ) -> str:
        """`ray job submit --no-wait --working-dir DIR -- ENTRYPOINT`; returns the submission id."""
        submission_id = submission_id or f"reclora-{uuid.uuid4().hex[:10]}"
        cmd = [
            self.ray_bin,
            "job",
            "submit",
            "--no-wait",
            f"--submission-id={submission_id}",
            f"--working-dir={working_dir}",
        ]
        if runtime_env_json:
            cmd.append(f"--runtime-env-json={runtime_env_json}")
        cmd += ["--", *entrypoint]
        log.info("%s", " ".join(cmd))
        done = subprocess.run(cmd, env=self.cli_env(), capture_output=True, text=True, timeout=180)
        if done.returncode != 0:
            raise JobFailed(f"ray job submit failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
        return submission_id

    def status(self, submission_id: str) -> str:
        return str(self.sdk.get_job_status(submission_id).value)

    def logs(self, submission_id: str) -> str:
        return self.sdk.get_job_logs(submission_id)

    def wait(self, submission_id: str, timeout_s: float, expect: str = "SUCCEEDED", poll_s: float = 1.0) -> str:
        """Block until the job ends; raise JobFailed (with its logs) unless it ends in `expect`."""
        deadline = time.monotonic() + timeout_s
        while (status := self.status(submission_id)) not in TERMINAL:
            if time.monotonic() > deadline:
                self.sdk.stop_job(submission_id)
                raise JobFailed(
                    f"job {submission_id} still {status} after {timeout_s:.0f}s; "
                    f"stopped it. Logs:\n{self.logs(submission_id)}"
                )
            time.sleep(poll_s)
        if status != expect:
            info = self.sdk.get_job_info(submission_id)
            raise JobFailed(f"job {submission_id} ended {status} ({info.message}). Logs:\n{self.logs(submission_id)}")
        return status
