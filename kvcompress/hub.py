"""Compressor artifacts: a directory (or a Hub model repo of the same layout) that any method saves and loads.

    compressor_config.json   method, format and kvcompress versions, the base model and its shapes,
                             cache settings, ranks, calibration data and fit metrics
    model.safetensors        the fitted tensors
    README.md                a generated model card

`CompressorArtifact` follows `huggingface_hub.ModelHubMixin`: `save_pretrained`, `push_to_hub`
and `from_pretrained` (a local directory or a Hub id). Loading checks the format version and the
method at once; a loaded artifact is shared by every cache built from the same files; and the
first attention call of each layer checks that the artifact was fitted for that model.

The pretrained compressors ship inside the package as complete Hub repositories
(`kvcompress/pretrained/<name>` = Hub repo `kvcompress/<name>`): `list_pretrained` lists them,
`publish_pretrained` uploads them, and their ids load the shipped copy where the Hub has no answer.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import functools
import hashlib
import inspect
import json
import logging
import math
import re
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import getproxies

import torch
from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData, ModelHubMixin, constants, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .cache import CompressedCache
from .config import ConfigError
from .models import DEFAULT_MODEL, DEFAULT_MODEL_HUB_ID, kv_shape
from .parallel import full, module_kv_heads
from .schema import ARTIFACT, FINGERPRINT_NAMES, check

FORMAT_VERSION = 1
DOWNLOAD_ARGUMENTS = ("cache_dir", "force_download", "local_files_only")  # from_pretrained keywords that go to the download
CONFIG_FILE = "compressor_config.json"
WEIGHTS_FILE = "model.safetensors"
EVALUATION_FILE = "evaluation.json"  # shipped repositories: the measured comparison their model card shows
REPORT_FILES = (  # what calibration and benchmarks/pretrained.py write beside the weights: each describes the weights it was made for
    "calibration_results.json", EVALUATION_FILE, "ranks.json", "fisher.json", "gate_report.json", "gate_report.png", "training_history.json", "training.png",
)
FINGERPRINT_TOLERANCE = 1e-2  # relative; loose enough for bf16/fp16 copies of the same weights
PRETRAINED_NAMESPACE = "kvcompress"
DAMAGED_ADVICE = ("From the Hub: download it again (from_pretrained(..., force_download=True)). A directory of your own: copy it again, "
                  "or calibrate it anew (kvcompress calibrate ... --overwrite).")
PRETRAINED_DIR = Path(__file__).resolve().parent / "pretrained"  # one folder per Hub repo kvcompress/<folder>

logger = logging.getLogger("kvcompress")
_SHIPPED_IN_USE: set[str] = set()  # Hub ids this process loads from the shipped copies (the Hub had no answer for them)
_METHODS: dict[str, type[CompressorArtifact]] = {}  # the registry: method name -> artifact class (which names its cache class)

MODEL_CARD = """---
{{ card_data }}
---

# {{ title }}

A fitted **{{ method }}** KV-cache compressor for {{ base_model_link }}, made with
[kvcompress](https://github.com/kvcompress/kvcompress) {{ version }}. It plugs into `model.generate()` as a
`transformers.Cache`.

```python
import kvcompress
from kvcompress import {{ cache_class }}

model, tokenizer = kvcompress.load_model("{{ base_model }}")   # or kvcompress.enable(your_model)
cache = {{ cache_class }}.from_pretrained("{{ repo_id }}"{{ cache_arguments }})
inputs = tokenizer("...", return_tensors="pt")
output = model.generate(**inputs, cache=cache, max_new_tokens=64)   # transformers before 5.24: past_key_values=cache
```

## How it was made

- Base model: `{{ base_model }}` ({{ shapes }})
- Calibration data: {{ data }}
- Command: `{{ command }}`
- Cache settings: {{ settings }}

## Metrics measured at calibration (on held-out text)

{{ metrics }}
{{ evaluation }}"""


class CompressorArtifact(ModelHubMixin, library_name="kvcompress", tags=["kvcompress", "kv-cache-compression"], model_card_template=MODEL_CARD):
    """The fitted part of a compressed cache: a config dict and named tensors.

    Subclasses set `method` (which registers them: `artifact_class`, `known_methods`) and `cache_class_name`
    (a cache class of their module, or of kvcompress), and declare their tensors in `expected_tensors`.
    """

    method: str = ""
    cache_class_name: str = ""
    config_schema = ARTIFACT  # `kvcompress.schema`: subclasses add their own sections

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        method = cls.__dict__.get("method")
        if method:
            known = _METHODS.get(method)
            if known is not None and (known.__module__, known.__qualname__) != (cls.__module__, cls.__qualname__):
                raise TypeError(f"Method {method!r} is already {known.__module__}.{known.__qualname__}'s; give {cls.__name__} a method name of its own.")
            _METHODS[method] = cls

    def __init__(self, config: dict, tensors: dict[str, torch.Tensor]):
        self.config = config | {"method": self.method}
        self.tensors = tensors
        self._hub_mixin_config = None  # the config lives in compressor_config.json, not the mixin's config.json
        self._checked_layers: set[int] = set()
        self._on_device: dict[str, dict] = {}
        self._served: dict[range, CompressorArtifact] = {}  # `for_heads`' artifacts
        self.validate()
        self.heads = range(self.config["base_model"]["num_kv_heads"])  # the KV heads its caches serve (`for_heads`)

    def for_heads(self, heads: range) -> CompressorArtifact:
        """This artifact serving only the KV heads `heads` of its model (one rank's, under tensor parallelism): what it builds
        on a device (`on_device`) holds those heads only, and the model check expects a layer sharded to them. Its tensors
        stay the loaded ones, shared."""
        if not isinstance(heads, range) or heads.step != 1 or not 0 <= heads.start < heads.stop <= len(self.heads):
            raise ValueError(f"heads must be a range of consecutive KV heads within the model's {len(self.heads)}, got {heads!r}.")
        if heads not in self._served:  # one per range: what it builds (and its model checks) is shared by every cache, as its whole's are
            served = copy.copy(self)
            served.heads, served._checked_layers, served._on_device, served._served = heads, set(), {}, {}
            self._served[heads] = served
        return self._served[heads]

    def own_heads(self, tensor: torch.Tensor, folded: bool = False) -> torch.Tensor:
        """The entries of the served heads of a ``[layers, kv_heads, ...]`` tensor, or with `folded` of a ``[layers * kv_heads, ...]`` one."""
        if len(self.heads) == self.config["base_model"]["num_kv_heads"]:
            return tensor
        per_layer = tensor.unflatten(0, (self.config["base_model"]["num_layers"], -1)) if folded else tensor
        served = per_layer[:, self.heads.start : self.heads.stop]
        return served.flatten(0, 1) if folded else served

    def expected_tensors(self) -> dict[str, tuple]:
        """The tensors this artifact must hold and their shapes, from its config. In a shape, None is any size and a
        string names a size that every tensor naming it must share (e.g. how many reference queries there are)."""
        return {"rope.inv_freq": (self.config["base_model"]["head_dim"] // 2,)}

    def validate(self) -> None:
        """Check the config against `config_schema` and the tensors against the config, in one place: every expected tensor
        present, of its shape, and holding finite floating-point numbers. An artifact is untrusted input: anything else is a
        clear `ConfigError`."""
        check(self.config, self.config_schema)
        base = self.config["base_model"]
        for name, norms in base["fingerprint"].items():
            if len(norms) != base["num_layers"]:
                raise ConfigError(f"compressor_config.json: base_model.fingerprint.{name} has {len(norms)} entries for {base['num_layers']} layers.")
        self.read_config()
        expected = self.expected_tensors()
        unknown = sorted(set(self.tensors) - set(expected))
        if unknown:
            raise ConfigError(f"The {self.method} compressor holds tensor(s) its config does not declare ({', '.join(unknown[:3])}...): the weights file is not this artifact's.")
        named: dict[str, tuple[int, str]] = {}  # a named size -> (its size, the first tensor that had it)
        for name, shape in expected.items():
            tensor = self.tensors.get(name)
            if tensor is None:
                raise ConfigError(f"The {self.method} compressor lacks tensor {name}; the weights file does not match its config.")
            if len(tensor.shape) != len(shape) or any(isinstance(want, int) and got != want for got, want in zip(tensor.shape, shape)):
                raise ConfigError(f"The {self.method} compressor's {name} is {tuple(tensor.shape)}, its config says {tuple(shape)}.")
            for got, want in zip(tensor.shape, shape):
                if isinstance(want, str):
                    size, first = named.setdefault(want, (got, name))
                    if size != got:
                        raise ConfigError(f"The {self.method} compressor's {name} holds {got} {want} but its {first} holds {size}: the weights file does not match itself.")
            if not tensor.is_floating_point():
                raise ConfigError(f"The {self.method} compressor's {name} holds {tensor.dtype}, not floating-point numbers: the weights file is not this artifact's.")
            if not bool(torch.isfinite(tensor).all()):
                raise ConfigError(
                    f"The {self.method} compressor's {name} holds NaN or infinite values: the weights file is corrupt. {DAMAGED_ADVICE}"
                )

    def read_config(self) -> None:
        """Build what the artifact derives from its config (which the schema has checked), before its tensors are checked."""

    @classmethod
    def cache_class(cls) -> type:
        """The cache class this artifact is fitted for (`cache_class_name`, in the artifact's module or in kvcompress):
        its constructor takes the artifact first (`kvcompress.load_cache`)."""
        import kvcompress

        return getattr(sys.modules[cls.__module__], cls.cache_class_name, None) or getattr(kvcompress, cls.cache_class_name)

    def cache_settings(self, **overrides) -> dict:
        """The cache settings (sink, window, block_size) fitted with the artifact, with the non-None `overrides` applied."""
        settings = dict(self.config.get("cache", {})) | {name: value for name, value in overrides.items() if value is not None}
        return {name: value for name, value in settings.items() if name in ("sink", "window", "block_size")}

    def on_device(self, name: str, device, build):
        """`build()`'s result for (`name`, `device`), built once and shared by every cache made from this artifact."""
        cached = self._on_device.setdefault(name, {})
        if str(device) not in cached:
            cached[str(device)] = build()
        return cached[str(device)]

    def inv_freq(self, device) -> torch.Tensor:
        """The base model's RoPE frequencies on `device` (for methods that work on keys before RoPE)."""
        return self.on_device("rope.inv_freq", device, lambda: self.tensors["rope.inv_freq"].to(device))

    # ------------------------------------------------------------------------------------ saving
    def _save_pretrained(self, save_directory: Path) -> None:
        from . import __version__

        directory = Path(save_directory)
        weights = directory / WEIGHTS_FILE
        earlier = _saved_compressor(directory)
        replaced = earlier is not None and not _same_tensors(earlier[1], self.tensors)
        save_file({name: tensor.contiguous() for name, tensor in self.tensors.items()}, str(weights), metadata={"format": "pt"})
        config = {"format_version": FORMAT_VERSION, "kvcompress_version": __version__} | self.config
        config = {"sha256": checksum(config, weights)} | config
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        (directory / "README.md").unlink(missing_ok=True)  # the card describes these weights: always regenerate it
        if replaced:  # its reports: those written with it, not since (a plot of this compressor made before it was saved stays)
            removed = [name for name in REPORT_FILES if (directory / name).is_file() and (directory / name).stat().st_mtime_ns <= earlier[2]]
            for name in removed:
                (directory / name).unlink()
            logger.warning(
                f"{directory}/ held another compressor ({earlier[0]}), now replaced by this {self.method} one"
                + (f"; its reports are removed ({', '.join(removed)}), since they describe the old weights." if removed else ".")
            )

    def generate_model_card(self, repo_id: str | None = None, **kwargs) -> ModelCard:
        """The model card: usage, how the artifact was made, its calibration metrics and, for a shipped
        repository, the comparison in its `evaluation.json` (also as the card's `model-index`)."""
        from . import __version__

        base = self.config["base_model"]
        base_id = base.get("name_or_path", "?")
        hub_base = DEFAULT_MODEL_HUB_ID if base_id == DEFAULT_MODEL else base_id
        metrics = self.config.get("metrics") or {}
        table = "\n".join(["| metric | value |", "|---|---|"] + [f"| {name} | {_format(value)} |" for name, value in metrics.items()])
        evaluation = kwargs.pop("evaluation", None)
        card_data = ModelCardData(**self._hub_mixin_info.model_card_data.to_dict())
        if hub_base.count("/") == 1 and not hub_base.startswith((".", "/")):
            card_data.base_model = hub_base
        if evaluation:
            card_data.model_name = repo_id or self.method
            card_data.eval_results = _eval_results(evaluation)
        return ModelCard.from_template(
            card_data=card_data,
            template_str=self._hub_mixin_info.model_card_template,
            title=f"{self.method} compressor for {base_id}",
            method=self.method,
            cache_class=self.cache_class_name,
            base_model=base_id,
            base_model_link=f"[{hub_base}](https://huggingface.co/{hub_base})" if card_data.base_model else f"`{base_id}`",
            version=__version__,
            repo_id=repo_id or "path/to/this/directory",
            cache_arguments=kwargs.pop("cache_arguments", ""),
            shapes=f"{base['num_layers']} layers, {base['num_kv_heads']} KV heads, head dim {base['head_dim']}",
            data=self.config.get("calibration", {}).get("data", "?"),
            command=self.config.get("calibration", {}).get("command", "(not recorded)"),
            settings=json.dumps(self.config.get("cache", {})),
            metrics=table if metrics else "(none recorded)",
            evaluation=evaluation["markdown"] if evaluation else "",
            **kwargs,
        )

    def push_to_hub(self, repo_id: str, **kwargs) -> str:
        """Upload `save_pretrained`'s directory to a Hub model repo (the card shows `repo_id` in its usage snippet)."""
        kwargs.setdefault("model_card_kwargs", {})
        kwargs["model_card_kwargs"] = {"repo_id": repo_id} | kwargs["model_card_kwargs"]
        return super().push_to_hub(repo_id, **kwargs)

    # ----------------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | Path, *, revision: str | None = None, cache_dir=None, force_download: bool = False,
        local_files_only: bool = False, token=None, **kwargs,
    ):
        """Load from a directory made by `save_pretrained` or a Hub repo id; the same files give the same shared object."""
        return cls._from_pretrained(
            model_id=str(pretrained_model_name_or_path), revision=revision, cache_dir=cache_dir,
            force_download=force_download, local_files_only=local_files_only, token=token, **kwargs,
        )

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision, cache_dir, force_download, local_files_only, token, **kwargs):
        if kwargs:
            raise TypeError(f"Unexpected argument(s) {sorted(kwargs)} for {cls.__name__}.from_pretrained.")
        config_file, weights_file = _resolve(model_id, revision=revision, cache_dir=cache_dir, force_download=force_download, local_files_only=local_files_only, token=token)
        return _load(cls._for_method(config_file), str(config_file), str(weights_file), _stamp(config_file), _stamp(weights_file))

    @classmethod
    def _for_method(cls, config_file: Path) -> type[CompressorArtifact]:
        """A family class without a method of its own (e.g. LowRankCompressor) loads as the subclass its artifact names."""
        if cls.method:
            return cls
        try:
            owner = artifact_class(json.loads(Path(config_file).read_bytes()).get("method"))
        except (ValueError, AttributeError):
            return cls  # _load reports the broken file
        return owner if owner is not None and issubclass(owner, cls) else cls

    # ------------------------------------------------------------------------------ model checks
    def check_shapes(self, layer_idx: int, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Raise if a layer's key/value states do not have the shapes this artifact was fitted for."""
        base = self.config["base_model"]
        expected = (len(self.heads), base["head_dim"])
        got = (key_states.shape[1], key_states.shape[-1])
        if layer_idx >= base["num_layers"] or got != expected or value_states.shape[-1] != base.get("head_dim_v", base["head_dim"]):
            raise ValueError(
                f"This {self.method} compressor was fitted for {base.get('name_or_path')} ({base['num_layers']} layers, "
                f"{expected[0]} KV heads of dim {expected[1]}) but layer {layer_idx} of this model has {got[0]} KV heads of dim "
                f"{got[1]}. Use a compressor fitted for this model (kvcompress calibrate --model ...)."
            )

    def check_module(self, module) -> None:
        """Once per layer: raise if the model is not the architecture this artifact was fitted for, or the layer's attention
        projections are not the ones it was fitted on (their weight norms, within `FINGERPRINT_TOLERANCE`)."""
        layer_idx = module.layer_idx
        if layer_idx in self._checked_layers:
            return
        base = self.config["base_model"]
        fitted_for = f"This {self.method} compressor was fitted for {base['name_or_path']} ({base['model_type']})"
        advice = "Use a compressor fitted for this model (kvcompress calibrate --model ...)."
        fitted = {"model_type": base["model_type"], "num_attention_heads": base["num_attention_heads"]}
        different = [f"{name} {getattr(module.config, name)!r} (fitted: {value!r})" for name, value in fitted.items() if getattr(module.config, name) != value]
        if different:
            raise ValueError(f"{fitted_for}, not for this model: its {', '.join(different)}. {advice}")
        for name in FINGERPRINT_NAMES:
            got, expected = _weight_norm(getattr(module, name)), base["fingerprint"][name][layer_idx]
            if not math.isclose(got, expected, rel_tol=FINGERPRINT_TOLERANCE):
                raise ValueError(f"{fitted_for}, not for this model: layer {layer_idx} {name} weight norm is {got:.4g}, the fitted model's was {expected:.4g}. {advice}")
        computed = module_kv_heads(module, base["num_kv_heads"], base["head_dim"])
        if computed != self.heads:
            raise ValueError(
                f"Layer {layer_idx} computes KV heads {computed.start}-{computed.stop - 1} but this cache serves heads {self.heads.start}-{self.heads.stop - 1}: "
                "under tensor parallelism run one process per shard over every process (torchrun --nproc_per_node N with tp_plan='auto')."
            )
        self._checked_layers.add(layer_idx)


def frozen_module(build, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The module `build()` makes, built on the meta device (shapes only: no random initialization, which would move the
    user's random state) with `state`'s tensors as its parameters, for inference only."""
    with torch.device("meta"):
        module = build()
    module.load_state_dict(state, assign=True)
    return module.eval().requires_grad_(False)


def model_signature(model, name_or_path: str | None = None, revision: str | None = None) -> dict:
    """The `base_model` section of a compressor config: identity, shapes and a K/V-projection fingerprint."""
    config = model.config
    attention = [layer.self_attn for layer in model.model.layers]
    num_layers, num_kv_heads, head_dim = kv_shape(config)
    return {
        "name_or_path": name_or_path or config._name_or_path,
        "revision": revision,
        "model_type": config.model_type,
        "num_layers": num_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_kv_heads": num_kv_heads,
        "head_dim": head_dim,
        "fingerprint": {name: [_weight_norm(getattr(a, name)) for a in attention] for name in FINGERPRINT_NAMES},
    }


def same_base_model(first: dict, second: dict) -> bool:
    """Whether two `model_signature`s describe the same model: its type and shapes, and fingerprints within `FINGERPRINT_TOLERANCE`."""
    shape = ("model_type", "num_layers", "num_attention_heads", "num_kv_heads", "head_dim")
    if any(first[name] != second[name] for name in shape):
        return False
    return all(
        math.isclose(a, b, rel_tol=FINGERPRINT_TOLERANCE)
        for name in FINGERPRINT_NAMES for a, b in zip(first["fingerprint"][name], second["fingerprint"][name])
    )


def _weight_norm(projection) -> float:
    """The norm of a projection's whole weight: gathered where tensor parallelism shards it, brought in from where accelerate
    offloaded it (to the CPU or disk: its parameters wait on the meta device while the module is not running), and
    de-quantized where the model's weights are quantized (torchao's weight tensors: a quantized copy of the fitted model
    is that model, within `FINGERPRINT_TOLERANCE`)."""
    with _onloaded(projection):
        weight = full(projection.weight.detach())
        if type(weight).dequantize is not torch.Tensor.dequantize:  # a tensor subclass that stands for a float weight
            weight = weight.dequantize()
        return float(weight.float().norm())


def _onloaded(module):
    """A context in which `module`'s parameters are real tensors, also when accelerate offloaded them."""
    if not module.weight.is_meta:
        return contextlib.nullcontext()
    try:
        from accelerate.utils import align_module_device
    except ImportError as error:
        raise ImportError(
            "This model's weights are offloaded (on the meta device until each module runs): checking a compressor against them "
            "needs accelerate>=1.1 (pip install -U accelerate)."
        ) from error
    return align_module_device(module)


def _format(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def checksum(config: dict, weights: Path) -> str:
    """The sha256 that seals an artifact: of its config (without the checksum, as canonical JSON) and its weights file. Any
    change to either (a corrupt download, random bytes that still parse as finite numbers, an edited field) is refused."""
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, separators=(",", ":")).encode())
    digest.update(Path(weights).read_bytes())
    return digest.hexdigest()


def _saved_compressor(directory: Path) -> tuple[str, dict, int] | None:
    """(method, tensors, when its config was written) of a compressor saved in `directory` before, if one is there: saving
    other weights over it takes its reports away (transformers' save_pretrained likewise cleans out an earlier save's shards)."""
    config, weights = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    if not (config.is_file() and weights.is_file()):
        return None
    try:
        method = json.loads(config.read_bytes()).get("method", "unknown method")
    except (ValueError, AttributeError):
        method = "unreadable config"
    try:
        tensors = load_file(weights)
    except (SafetensorError, OSError):
        tensors = {}
    return str(method), tensors, max(config.stat().st_mtime_ns, weights.stat().st_mtime_ns)


def _as_python(value: str) -> str:
    """A command-line option value as Python source: a number as it is, anything else quoted."""
    try:
        float(value)
        return value
    except ValueError:
        return repr(value)


def _same_tensors(first: dict, second: dict) -> bool:
    return first.keys() == second.keys() and all(torch.equal(first[name], second[name].cpu()) for name in first)


_BASELINE_CACHES = {"h2o": "H2OCache", "streamingllm": "StreamingLLMCache"}


def _not_a_compressor(name: str) -> str | None:
    """What a cache or method name passed where a compressor goes is, and what to pass instead (None: not such a name)."""
    name = name.lower()
    if name in _BASELINE_CACHES:
        return (f"'{name}' names a cache, not a compressor: {_BASELINE_CACHES[name]} needs no fitted weights; build it directly, "
                f"e.g. kvcompress.{_BASELINE_CACHES[name]}(ratio=8).")
    owner = artifact_class(name)
    if owner is None:
        return None
    shipped = [pretrained.repo_id for pretrained in list_pretrained() if pretrained.method == name]
    return (f"'{name}' names a method, not a compressor: {owner.cache_class_name}.from_pretrained needs one fitted for your model, a directory "
            f"made by `kvcompress calibrate --method {name}` or a Hub id" + (f" (for {DEFAULT_MODEL}: {shipped[0]})" if shipped else "") + ".")


def _stamp(path: Path) -> tuple[int, int]:
    stat = Path(path).stat()
    return stat.st_mtime_ns, stat.st_size


def _resolve(model_id: str, **download_kwargs) -> tuple[Path, Path]:
    """Paths of the config and weights files of a local directory or a Hub repo.

    A Hub id resolves through `huggingface_hub` as any model does (HF_ENDPOINT, revision, the local Hub
    cache, HF_HUB_OFFLINE / local_files_only). Where that finds nothing and the id is one of the
    repositories that ship inside kvcompress, the shipped copy is used and the log says so once.
    """
    directory = Path(model_id)
    name, _, options = model_id.partition("@")
    if not directory.exists() and re.fullmatch(r"[A-Za-z_]\w*=[^,/\\=]+(,[A-Za-z_]\w*=[^,/\\=]+)*", options):  # the command line's DIR@key=value,...
        keywords = ", ".join(f"{key}={_as_python(value)}" for key, value in (pair.split("=") for pair in options.split(",")))
        call = f"ComposedCache.from_pretrained({keywords})" if name == "compose" else f"load_cache({name!r}, {keywords})"
        raise FileNotFoundError(f"{model_id}: options after @ are the command line's way (and CacheSpec.fitted's) to give them; in Python pass keywords: {call}.")
    if directory.is_dir():
        files = directory / CONFIG_FILE, directory / WEIGHTS_FILE
        for file in files:
            if not file.is_file():
                raise FileNotFoundError(f"{directory} has no {file.name}: it is not a complete kvcompress compressor directory (made by save_pretrained or kvcompress calibrate).")
        return files
    if directory.exists() or looks_like_local_path(model_id):
        raise FileNotFoundError(f"{model_id} is not a compressor directory (none exists there) nor a Hub repo id like 'user/name'.")
    if (mistaken := _not_a_compressor(model_id)) is not None:
        raise FileNotFoundError(mistaken)
    shipped = shipped_repository(model_id) if download_kwargs.get("revision") in (None, "main") else None
    if shipped is not None and model_id in _SHIPPED_IN_USE and not download_kwargs.get("force_download"):
        return shipped / CONFIG_FILE, shipped / WEIGHTS_FILE  # the Hub had no answer for it earlier in this process: do not wait again
    unreachable = not constants.HF_HUB_OFFLINE and not download_kwargs.get("local_files_only") and not _hub_host_resolves()
    if download_kwargs.get("force_download") and (constants.HF_HUB_OFFLINE or download_kwargs.get("local_files_only") or unreachable):
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "local_files_only=True" if download_kwargs.get("local_files_only") else f"its host {_hub_host()} does not resolve (no network?)"
        raise FileNotFoundError(
            f"force_download=True downloads {model_id} again from the Hub, which cannot be reached here: {why}. Download it where the "
            "Hub can be reached, or load the copy you have without force_download."
        )
    if unreachable:  # no network: asking would retry for ~23 s before failing; the local Hub cache still counts
        download_kwargs = download_kwargs | {"local_files_only": True}
    try:
        return tuple(Path(hf_hub_download(model_id, filename, **download_kwargs)) for filename in (CONFIG_FILE, WEIGHTS_FILE))
    except (LocalEntryNotFoundError, RepositoryNotFoundError) as error:
        if shipped is None:
            raise _not_found(model_id, error, unreachable) from None
        if isinstance(error, RepositoryNotFoundError):
            reason = "the Hub has no such repository"
        elif constants.HF_HUB_OFFLINE:
            reason = "HF_HUB_OFFLINE is set and the repository is not in the local Hub cache"
        elif unreachable:
            reason = f"the Hub's host {_hub_host()} does not resolve (no network?) and the repository is not in the local Hub cache"
        else:
            reason = "the Hub did not answer and the repository is not in the local Hub cache (HF_HUB_OFFLINE=1 skips asking)"
        logger.warning("%s: %s; using the copy that ships with kvcompress (%s).", model_id, reason, shipped)
        _SHIPPED_IN_USE.add(model_id)
        return shipped / CONFIG_FILE, shipped / WEIGHTS_FILE
    except RevisionNotFoundError:
        raise FileNotFoundError(f"Hub repo {model_id!r} has no revision {download_kwargs.get('revision')!r}.") from None
    except EntryNotFoundError as error:
        raise FileNotFoundError(f"Hub repo {model_id!r} is not a kvcompress compressor: {error}") from None


def _hub_host() -> str | None:
    """The host name of the Hub endpoint huggingface_hub asks (HF_ENDPOINT)."""
    return urlparse(constants.ENDPOINT).hostname


def _hub_host_resolves() -> bool:
    """Whether the Hub endpoint's host name resolves (or a proxy, which resolves it, is set). Where it does not (no network),
    huggingface_hub retries each request five times, for about 23 s, before it gives up."""
    if getproxies():
        return True
    try:
        socket.getaddrinfo(_hub_host(), None)
    except (socket.gaierror, UnicodeError):
        return False
    return True


def hub_unreachable() -> str | None:
    """Why nothing can be downloaded from the Hub now (HF_HUB_OFFLINE, or its host does not resolve), or None. Loaders of
    models and corpora ask before they let a name that is not a local path go to the Hub: there, a mistyped directory
    would wait out huggingface_hub's retries and then report a connection error instead of the missing directory."""
    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    if not _hub_host_resolves():
        return f"the Hub's host {_hub_host()} does not resolve (no network?)"
    return None


def looks_like_local_path(name: str) -> bool:
    """Whether `name` can only be a local path, not a Hub id (``name`` or ``owner/name``)."""
    return name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1 or name.endswith("/")


def missing_locally(name: str, what: str, reason: str, cached: bool = False, hint: str | None = None) -> FileNotFoundError:
    """`name` is neither a local path nor reachable as a Hub/datasets name (`reason`); `hint` says what to try instead
    (by default, a close local name if any)."""
    if hint is None:
        parent = Path(name).expanduser().parent
        nearby = [entry.name for entry in parent.iterdir()] if parent.is_dir() else []
        close = difflib.get_close_matches(Path(name).name, nearby, n=1, cutoff=0.75)
        hint = f" Did you mean {parent / close[0] if str(parent) != '.' else close[0]}?" if close else ""
    cache = " and it is not in the local cache" if cached else ""
    return FileNotFoundError(f"{name} is not a local {what} ({Path(name).expanduser().resolve()} does not exist), and as a Hub name it cannot be downloaded: {reason}{cache}.{hint}")


def _not_found(model_id: str, error: Exception, unreachable: bool) -> FileNotFoundError:
    if isinstance(error, RepositoryNotFoundError):
        return FileNotFoundError(f"No Hub repo {model_id!r} (or no access to it: pass token=... for a private repo).")
    offline = " (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else f" (its host {_hub_host()} does not resolve)" if unreachable else ""
    close = difflib.get_close_matches(model_id.partition("/")[2], shipped_names(), n=1)
    hint = f" Did you mean {PRETRAINED_NAMESPACE}/{close[0]}?" if close else ""
    return missing_locally(model_id, "directory", f"the Hub was not reachable{offline}", cached=True,
                           hint=f"{hint} `kvcompress pretrained` lists the compressors that ship with kvcompress and load without the Hub.")


# ------------------------------------------------------------------------- shipped repositories
def shipped_repository(repo_id: str) -> Path | None:
    """The folder of the Hub repository `repo_id` inside kvcompress, if it is one that ships with it."""
    namespace, _, name = repo_id.partition("/")
    directory = PRETRAINED_DIR / name
    return directory if namespace == PRETRAINED_NAMESPACE and name and (directory / CONFIG_FILE).is_file() else None


@dataclass(frozen=True)
class PretrainedCompressor:
    """One shipped compressor, as its config and model card describe it."""

    repo_id: str
    method: str
    cache_class: str
    base_model: str
    path: Path
    calibration_metrics: dict  # measured by `kvcompress calibrate` (held-out perplexity, memory)
    evaluation: dict  # name -> value of the card's measured results (model-index), empty if it has none
    load_options: dict  # the from_pretrained options those results were measured with (e.g. ratio=8, context=1536)

    @property
    def size_bytes(self) -> int:
        return sum(file.stat().st_size for file in self.path.iterdir() if file.is_file())


def shipped_names() -> list[str]:
    """The names (Hub ids `kvcompress/<name>`) of the compressors that ship inside kvcompress, sorted."""
    return sorted(path.parent.name for path in PRETRAINED_DIR.glob(f"*/{CONFIG_FILE}"))


def list_pretrained() -> list[PretrainedCompressor]:
    """The compressors that ship with kvcompress (and are published as `kvcompress/<name>` on the Hub)."""
    found = []
    for name in shipped_names():
        directory = PRETRAINED_DIR / name
        config = json.loads((directory / CONFIG_FILE).read_text())
        card = ModelCard.load(directory / "README.md") if (directory / "README.md").is_file() else None
        results = (card.data.eval_results or []) if card else []
        owner = artifact_class(config["method"])
        found.append(PretrainedCompressor(
            repo_id=f"{PRETRAINED_NAMESPACE}/{directory.name}", method=config["method"],
            cache_class=owner.cache_class_name if owner else "?", base_model=config["base_model"]["name_or_path"], path=directory,
            calibration_metrics=config.get("metrics", {}), evaluation={result.metric_name: result.metric_value for result in results},
            load_options=json.loads(evaluation.read_text()).get("load_options", {}) if (evaluation := directory / EVALUATION_FILE).is_file() else {},
        ))
    return found


def publish_pretrained(namespace: str = PRETRAINED_NAMESPACE, *, dry_run: bool = False, token: str | None = None, private: bool = False) -> list[str]:
    """Upload every shipped repository to the Hub as `<namespace>/<name>` (create_repo + upload_folder).

    With `dry_run`, only say what would go where. Returns the repo ids.
    """
    api = HfApi(token=token)
    repo_ids = []
    for item in list_pretrained():
        repo_id = f"{namespace}/{item.path.name}"
        files = sorted(file.name for file in item.path.iterdir() if file.is_file())
        print(f"{'would upload' if dry_run else 'uploading'} {item.path} ({len(files)} files, {item.size_bytes / 2**20:.2f} MiB: "
              f"{', '.join(files)}) -> {constants.ENDPOINT}/{repo_id}")
        if not dry_run:
            api.create_repo(repo_id, repo_type="model", exist_ok=True, private=private)
            api.upload_folder(repo_id=repo_id, folder_path=item.path, repo_type="model", commit_message=f"{item.method} compressor for {item.base_model}")
        repo_ids.append(repo_id)
    return repo_ids


def _eval_results(evaluation: dict) -> list[EvalResult]:
    """The card's model-index: this compressor's own measured row of `evaluation.json`."""
    row = evaluation["row"]
    dataset = evaluation["dataset"]
    return [
        EvalResult(task_type="text-generation", dataset_type="wikitext", dataset_name=dataset, dataset_split="held-out last 20%",
                   metric_type=metric_type, metric_name=name, metric_value=round(row[name], 4))
        for name, metric_type in (("compression_ratio", "compression_ratio"), ("perplexity", "perplexity"), ("passkey_1536", "accuracy"),
                                  ("passkey_6144", "accuracy"), ("multikey_1536", "accuracy"))
        if row.get(name) is not None
    ]


@functools.lru_cache(maxsize=16)
def _load(cls, config_file: str, weights_file: str, config_stamp, weights_stamp) -> CompressorArtifact:
    """One artifact per (class, files, file versions): caches built from the same files share its tensors."""
    try:
        config = json.loads(Path(config_file).read_bytes())
    except ValueError as error:  # not JSON, or not text
        raise ConfigError(f"{config_file} is not valid JSON ({error}); re-download or re-save the compressor.") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{config_file} must hold a JSON object.")
    version = config.get("format_version")
    if not isinstance(version, int):
        raise ConfigError(f"{config_file} has no integer 'format_version': it was not written by kvcompress.")
    if version > FORMAT_VERSION:
        raise ConfigError(
            f"{config_file} has format version {version}, newer than this kvcompress reads ({FORMAT_VERSION}); "
            f"it was written by kvcompress {config.get('kvcompress_version', '?')}. Upgrade kvcompress (pip install -U kvcompress)."
        )
    method = config.get("method")
    if method != cls.method:
        owner = artifact_class(method)
        if owner is None:
            raise ConfigError(
                f"{config_file} holds a {method!r} compressor: not a known kvcompress method (known: {', '.join(known_methods())}). "
                "A method of your own registers when the module that defines its artifact class is imported: import it first."
            )
        loader = cls.cache_class_name or cls.__name__  # the cache the user called, where the artifact class has one
        raise ConfigError(
            f"{config_file} holds a {method!r} compressor, which {loader} does not load: load it with {owner.cache_class_name}.from_pretrained "
            "(kvcompress.load_cache picks the class)."
        )
    recorded = config.pop("sha256", None)
    if not isinstance(recorded, str):
        raise ConfigError(f"{config_file} has no 'sha256' (the checksum of the config and {WEIGHTS_FILE}); re-save the compressor with this kvcompress.")
    if checksum(config, Path(weights_file)) != recorded:
        raise ConfigError(
            f"{Path(config_file).parent} does not match the checksum in its {CONFIG_FILE} (it covers the config and {WEIGHTS_FILE}): a file is "
            f"corrupt, truncated, edited or from another compressor. {DAMAGED_ADVICE}"
        )
    try:
        tensors = load_file(weights_file)
    except (SafetensorError, OSError) as error:
        raise ConfigError(f"{weights_file} is corrupt or not a safetensors file ({error}). {DAMAGED_ADVICE}") from None
    config = {key: value for key, value in config.items() if key not in ("format_version", "kvcompress_version")}
    return cls(config, tensors)


class FittedCache(CompressedCache):
    """A preset cache built on a fitted artifact of `artifact_class`, which its constructor takes first."""

    artifact_class: type[CompressorArtifact] = CompressorArtifact

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str | Path, *args, revision: str | None = None, token: str | bool | None = None, **settings):
        """A fresh cache from an artifact directory or Hub repo; caches of the same files share its weights. `args` and `settings`
        go to the constructor, except the download keywords (`DOWNLOAD_ARGUMENTS`)."""
        download = {name: settings.pop(name) for name in DOWNLOAD_ARGUMENTS if name in settings}
        artifact = cls.artifact_class.from_pretrained(path_or_hub_id, revision=revision, token=token, **download)
        cache_class = cls if cls.artifact_class.method else artifact.cache_class()
        check_options(cache_class, settings, exclude=("compressor",))
        return cache_class(artifact, *args, **settings)


def check_options(cache_class: type, settings: dict, exclude: tuple = ()) -> None:
    """Refuse `settings` that `cache_class`'s constructor does not take, naming the ones it does (Python's own TypeError
    names one unknown keyword and not what would do)."""
    options = [name for name in inspect.signature(cache_class).parameters if name not in exclude]
    unknown = [name for name in settings if name not in options]
    if unknown:
        raise TypeError(f"{cache_class.__name__} has no option {', '.join(map(repr, unknown))}; its options: {', '.join(options)}.")


def load_cache(path_or_hub_id: str | Path, *, revision: str | None = None, token: str | bool | None = None, **settings) -> FittedCache:
    """A fresh cache of the class an artifact (a directory or Hub id) was fitted for, with `settings` for its constructor
    (e.g. ``ratio=8``): ``kvcompress.load_cache("kvcompress/smollm2-135m-instruct-gate", ratio=8)`` is a `GatedCache`."""
    return FittedCache.from_pretrained(path_or_hub_id, revision=revision, token=token, **settings)


def artifact_class(method: str) -> type[CompressorArtifact] | None:
    """The artifact class of a method name (its `cache_class()` is the method's cache), if kvcompress knows it."""
    return _METHODS.get(method) if isinstance(method, str) else None


def known_methods(family: type[CompressorArtifact] = CompressorArtifact) -> list[str]:
    """The method names of the registered artifact classes (of `family`, e.g. `LowRankCompressor`), sorted."""
    return sorted(method for method, owner in _METHODS.items() if issubclass(owner, family))
