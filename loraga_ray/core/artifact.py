"""The init artifact: per-layer top-k SVD of the gradient estimate, plus metadata.

On disk it is a folder:

* ``factors.safetensors``: for every target layer ``<name>.U`` (d_out x k), ``<name>.S`` (k),
  ``<name>.V`` (d_in x k), float32, columns by descending singular value, G ~ U diag(S) V^T
  where G is the mean-loss gradient in (d_out, d_in) orientation.
* ``meta.json``: format, format_version, base_model, fingerprint, target_modules, shapes, k,
  max_rank, num_examples, num_targets, seed, svd settings, dataset fingerprint, versions, timings,
  and (format version 2) ``factors_sha256``, the sha256 of ``factors.safetensors``, so a reader
  refuses factors and meta that come from different writes or a damaged file.

* ``head.safetensors`` (sequence classification only): the classifier head the gradient went
  through (``classifier.weight``, ``classifier.bias``, ... as the model names them), float32.
  ``meta["head"]`` lists its tensors and shapes, the seed that drew it and the file's sha256.
  The fingerprint covers it, and every run trained from the artifact starts from this head, so
  the init and the head always belong together, whatever seed the run itself uses.

Format version 2 (this one) adds ``factors_sha256`` and the optional keys ``strategy``,
``driver_bytes_received`` (how the estimate ran) and ``head``; readers take version-1 artifacts
(no checksum) as they were.

One artifact serves every rank r <= k/2, every direction, scale, gamma and alpha.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .files import atomic_folder
from .targets import is_transposed

FORMAT = "loraga-ray-init"
FORMAT_VERSION = 2
REQUIRED_META = ("format", "format_version", "k", "target_modules", "shapes")
FACTORS_FILE = "factors.safetensors"
META_FILE = "meta.json"
HEAD_FILE = "head.safetensors"


class ArtifactError(ValueError):
    """The artifact is unreadable or does not fit the model it is applied to."""


def package_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for pkg in ("loraga-ray", "torch", "transformers", "peft", "ray"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def _canonical_sample(w: torch.Tensor, n: int = 16384) -> bytes:
    """A strided sample of the weight in (d_out, d_in) orientation, rounded to bfloat16 so
    the same checkpoint loaded in float32 or bfloat16 has the same fingerprint."""
    flat = w.detach().reshape(-1)
    step = max(1, flat.numel() // n)
    sample = flat[::step][:n].to("cpu", torch.bfloat16)
    return sample.view(torch.int16).numpy().tobytes()


def weight_fingerprint(model: nn.Module, names, head: Mapping[str, torch.Tensor] | None = None) -> str:
    """sha256 over the target layers' names, (d_out, d_in) shapes and a sample of their values,
    then over the classifier head's tensors (every value, rounded to bfloat16), when given.
    Without a head it is the fingerprint of artifacts that carry none."""
    modules = dict(model.named_modules())
    h = hashlib.sha256()
    for name in names:
        m = modules[name]
        w = m.weight.t() if is_transposed(m) else m.weight
        h.update(name.encode())
        h.update(str(tuple(w.shape)).encode())
        h.update(_canonical_sample(w))
    for name in sorted(head or {}):
        t = head[name]
        h.update(b"head:" + name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(_canonical_sample(t, n=max(16384, t.numel())))
    return h.hexdigest()


def head_state(model: nn.Module, heads) -> dict[str, torch.Tensor]:
    """The parameters of the modules ``heads`` (``classifier.weight``, ...), float32 on CPU."""
    out = {}
    for head in heads:
        for pname, p in model.get_submodule(head).named_parameters():
            out[f"{head}.{pname}"] = p.detach().to("cpu", torch.float32).clone()
    return out


def file_sha256(path: str | os.PathLike, chunk: int = 8 << 20) -> str:
    """sha256 (hex) of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def base_model_id(model: nn.Module) -> str | None:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "_name_or_path", None) or None


@dataclass
class InitArtifact:
    """Top-k SVD factors of each target layer's gradient and where they came from."""

    factors: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    meta: dict = field(default_factory=dict)
    head: dict[str, torch.Tensor] | None = None  # the classifier head the gradient went through

    @property
    def k(self) -> int:
        return int(self.meta["k"])

    @property
    def max_rank(self) -> int:
        return self.k // 2

    @property
    def target_modules(self) -> list[str]:
        return list(self.meta["target_modules"])

    def singular_values(self) -> dict[str, torch.Tensor]:
        return {n: f[1] for n, f in self.factors.items()}

    # ------------------------------------------------------------------ disk
    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the folder atomically: a temporary sibling is filled, then put in place, so an
        interrupted save leaves no half-written artifact. An existing artifact is replaced only
        with ``overwrite=True``; a folder that is not an artifact is never touched (see
        :func:`loraga_ray.core.files.atomic_folder`). ``meta`` gains ``factors_sha256``."""
        path = Path(path)
        with atomic_folder(path, kind="init artifact", overwrite=overwrite) as tmp:
            tensors = {}
            for name, (U, S, V) in self.factors.items():
                tensors[f"{name}.U"] = U.detach().to("cpu", torch.float32).contiguous()
                tensors[f"{name}.S"] = S.detach().to("cpu", torch.float32).contiguous()
                tensors[f"{name}.V"] = V.detach().to("cpu", torch.float32).contiguous()
            save_file(tensors, str(tmp / FACTORS_FILE), metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)})
            self.meta = dict(self.meta, format=FORMAT, format_version=FORMAT_VERSION,
                             factors_sha256=file_sha256(tmp / FACTORS_FILE))
            if self.head:
                save_file({n: t.detach().to("cpu", torch.float32).contiguous() for n, t in self.head.items()},
                          str(tmp / HEAD_FILE), metadata={"format": FORMAT})
                self.meta["head"] = dict(self.meta.get("head") or {}, sha256=file_sha256(tmp / HEAD_FILE),
                                         shapes={n: list(t.shape) for n, t in sorted(self.head.items())})
            else:
                self.meta.pop("head", None)
            (tmp / META_FILE).write_text(json.dumps(self.meta, indent=2, sort_keys=True))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "InitArtifact":
        """Read and check an artifact folder. Raises :class:`ArtifactError` naming the file and the
        fix for a missing or unreadable file, a ``meta.json`` that is not JSON or lacks a key, a
        newer format version, factors that do not match the checksum in ``meta.json``, NaN/Inf in
        a factor, or shapes that disagree with ``meta.json``."""
        path = Path(path)
        meta_path, fac_path = path / META_FILE, path / FACTORS_FILE
        again = "Estimate it again (`loraga-ray init ... --overwrite`), or copy the whole artifact folder anew."
        if not meta_path.is_file() or not fac_path.is_file():
            raise ArtifactError(
                f"{path} is not an init artifact: it needs {META_FILE} and {FACTORS_FILE}. "
                "Create one with `loraga-ray init` or estimate_init(...).save(path)."
            )
        try:
            meta = json.loads(meta_path.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise ArtifactError(f"{meta_path} is not valid JSON ({e}); the artifact is damaged. {again}") from None
        if not isinstance(meta, dict):
            raise ArtifactError(f"{meta_path} holds {type(meta).__name__}, not a JSON object; the artifact is damaged. {again}")
        if meta.get("format") != FORMAT:
            raise ArtifactError(f"{meta_path} has format {meta.get('format')!r}, expected {FORMAT!r}: it is not a "
                                "loraga-ray init artifact.")
        missing = [k for k in REQUIRED_META if k not in meta]
        if missing:
            raise ArtifactError(f"{meta_path} lacks {', '.join(repr(k) for k in missing)}; the artifact is damaged. {again}")
        version = meta["format_version"]
        if not isinstance(version, int) or version < 1:
            raise ArtifactError(f"{meta_path}: format_version {version!r} is not a positive integer. {again}")
        if version > FORMAT_VERSION:
            raise ArtifactError(
                f"{path} was written by a newer loraga-ray (format version {version}, this one reads up to "
                f"{FORMAT_VERSION}). Upgrade loraga-ray (pip install -U loraga-ray) to read it."
            )
        if version >= 2:
            want = meta.get("factors_sha256")
            if not want:
                raise ArtifactError(f"{meta_path} (format version {version}) lacks 'factors_sha256'. {again}")
            got = file_sha256(fac_path)
            if got != want:
                raise ArtifactError(
                    f"{fac_path} does not match {META_FILE} (sha256 {got[:12]}, meta.json says {str(want)[:12]}): the "
                    f"two files come from different writes, or the factors are damaged or truncated. {again}"
                )
        try:
            tensors = load_file(str(fac_path))
        except Exception as e:  # safetensors' own error type for a truncated or garbled file
            raise ArtifactError(f"{fac_path} cannot be read ({e}): it is truncated or damaged. {again}") from None
        k = int(meta["k"])
        factors = {}
        for name in meta["target_modules"]:
            try:
                U, S, V = tensors[f"{name}.U"], tensors[f"{name}.S"], tensors[f"{name}.V"]
            except KeyError as e:
                raise ArtifactError(f"{fac_path} lacks tensor {e.args[0]!r} listed in meta.json. {again}") from None
            try:
                d_out, d_in = meta["shapes"][name]
            except (KeyError, TypeError, ValueError):
                raise ArtifactError(f"{meta_path}: 'shapes' has no (d_out, d_in) for layer {name!r}. {again}") from None
            if U.shape != (d_out, k) or S.shape != (k,) or V.shape != (d_in, k):
                raise ArtifactError(
                    f"{fac_path}: layer {name!r} has U{tuple(U.shape)} S{tuple(S.shape)} V{tuple(V.shape)}, "
                    f"expected U({d_out}, {k}) S({k},) V({d_in}, {k}) from {META_FILE}. {again}"
                )
            for part, t in (("U", U), ("S", S), ("V", V)):
                if not bool(torch.isfinite(t).all()):
                    raise ArtifactError(f"{fac_path}: {name}.{part} holds NaN or Inf; the artifact is unusable. {again}")
            factors[name] = (U, S, V)
        return cls(factors=factors, meta=meta, head=_load_head(path, meta, again))

    # ------------------------------------------------------------------ checks
    def check_model(self, model: nn.Module) -> None:
        """Raise unless ``model``'s target weights are the ones the gradient was estimated on and,
        for an artifact with a classifier head, ``model`` has that head's tensors in the same
        shapes (their values may differ: :meth:`load_head` puts the artifact's in)."""
        self._check_head_shapes(model)
        modules = dict(model.named_modules())
        missing = [n for n in self.target_modules if n not in modules]
        if missing:
            raise ArtifactError(
                f"the artifact's target layers {missing[:3]} (of {len(missing)}) do not exist in "
                f"{type(model).__name__}; it was estimated on {self.meta.get('base_model')!r}. "
                "Apply it to that base model, or estimate a new artifact for this one."
            )
        fp = weight_fingerprint(model, self.target_modules, self.head)
        if fp != self.meta.get("fingerprint"):
            raise ArtifactError(
                f"the model's target weights do not match the artifact (fingerprint {fp[:12]} vs "
                f"{str(self.meta.get('fingerprint'))[:12]}); it was estimated on {self.meta.get('base_model')!r}. "
                "Load the unmodified base model it was estimated on (not one already initialised "
                "or fine-tuned), or estimate a new artifact for this model."
            )


    def _check_head_shapes(self, model: nn.Module) -> None:
        if not self.head:
            return
        params = dict(model.named_parameters())
        for name, t in sorted(self.head.items()):
            p = params.get(name)
            if p is None:
                raise ArtifactError(
                    f"the artifact carries the classifier head {name!r} its gradient went through, but "
                    f"{type(model).__name__} has no such parameter; it was estimated on a "
                    f"{self.meta.get('model_class')!r}. Load the model for the same task (sequence classification), "
                    "or estimate a new artifact for this one.")
            if tuple(p.shape) != tuple(t.shape):
                raise ArtifactError(
                    f"the artifact's classifier head {name} is {tuple(t.shape)}, this model's is {tuple(p.shape)}: the "
                    f"artifact was estimated with {self.meta.get('num_labels') or t.shape[0]} classes. Load the model "
                    "with that many labels, or estimate a new artifact on data with this model's classes.")

    def load_head(self, model: nn.Module) -> list[str]:
        """Copy the artifact's classifier head into ``model`` (the plain model, before any PEFT
        wrapping); returns the tensor names copied. A model without a head in the artifact is
        left as it is. Call :meth:`check_model` first."""
        if not self.head:
            return []
        self._check_head_shapes(model)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, t in self.head.items():
                params[name].copy_(t.to(params[name].device, params[name].dtype))
        return sorted(self.head)


def _load_head(path: Path, meta: dict, again: str) -> dict[str, torch.Tensor] | None:
    """The head tensors of an artifact whose meta lists a head; checked against its sha256."""
    info = meta.get("head")
    if not info:
        return None
    head_path = path / HEAD_FILE
    if not head_path.is_file():
        raise ArtifactError(f"{path}: meta.json lists a classifier head but {HEAD_FILE} is missing. {again}")
    got = file_sha256(head_path)
    if got != info.get("sha256"):
        raise ArtifactError(f"{head_path} does not match {META_FILE} (sha256 {got[:12]}, meta.json says "
                            f"{str(info.get('sha256'))[:12]}): the head and the factors come from different writes. {again}")
    try:
        head = load_file(str(head_path))
    except Exception as e:
        raise ArtifactError(f"{head_path} cannot be read ({e}): it is truncated or damaged. {again}") from None
    shapes = {n: list(t.shape) for n, t in head.items()}
    if shapes != dict(info.get("shapes") or {}):
        raise ArtifactError(f"{head_path} holds {shapes}, meta.json says {info.get('shapes')}. {again}")
    return head


def build_meta(
    *,
    model: nn.Module,
    target_names,
    shapes: Mapping[str, tuple[int, int]],
    fingerprint: str,
    k: int,
    num_examples: int,
    num_targets: int,
    seed: int,
    svd: str,
    niter: int,
    oversample: int | None,
    base_model: str | None = None,
    dataset_fingerprint: str | None = None,
    timings: Mapping[str, float] | None = None,
    extra: Mapping | None = None,
) -> dict:
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "base_model": base_model or base_model_id(model),
        "model_class": type(model).__name__,
        "fingerprint": fingerprint,
        "target_modules": list(target_names),
        "shapes": {n: list(shapes[n]) for n in target_names},
        "k": k,
        "max_rank": k // 2,
        "num_examples": num_examples,
        "num_targets": num_targets,
        "seed": seed,
        "svd": {"method": svd, "niter": niter, "oversample": oversample if oversample is not None else k},
        "dataset_fingerprint": dataset_fingerprint,
        "versions": package_versions(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "timings": dict(timings or {}),
    }
    if extra:
        meta.update(extra)
    return meta
