"""Raw readers, the prepare pipeline, the synthetic log generator and text templates."""
