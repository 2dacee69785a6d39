"""Embedding throughput and fidelity of hyprec against the peers a user would pick instead, on CPU.

What it measures
    For each model, in one interleaved run, every variant embeds the same real texts
    (``hyprec.texts.evaluation_texts``):

    * ``sentence-transformers float32`` (the reference) and ``sentence-transformers bfloat16`` (weights loaded
      with ``model_kwargs={"dtype": torch.bfloat16}``): ``SentenceTransformer.encode`` with ``--batch-size``;
    * ``ONNX Runtime CPU fp32``: the transformer exported to ONNX (float32), run by the CPU execution provider;
    * ``ONNX Runtime+OpenVINO f32``: the same file on the OpenVINO execution provider, ``precision=FP32`` (the
      EP sets OpenVINO's ``INFERENCE_PRECISION_HINT`` to f32);
    * ``ONNX Runtime+OpenVINO default``: no ``precision`` option. The onnxruntime-openvino wheel's own default
      for CPU is FP32, so this row should match the f32 one: it shows what a user who sets nothing gets;
    * ``ONNX Runtime+OpenVINO bf16 hint``: ``load_config`` ``INFERENCE_PRECISION_HINT=bf16``, which is
      OpenVINO's own CPU default where the CPU has bfloat16 (AMX, AVX512_BF16), i.e. what OpenVINO runs when no
      EP pins the precision; on a CPU without it OpenVINO computes in f32;
    * every hyprec policy of ``harness.HYPREC_POLICIES`` and ``hyprec default`` (``dtype="auto"``,
      ``attn_dtype="auto"``; the policy column shows what it resolved to).

    The ONNX variants reproduce the sentence-transformers pipeline around the exported transformer: the
    tokenizer of the model directory (``tokenizers``, truncated at the model's ``max_seq_length``, padded to the
    longest text of a batch), batches of ``--batch-size`` texts sorted by length as ``encode`` sorts them, then
    mean pooling over the attention mask and L2 normalisation in numpy, as the model's ``modules.json``
    declares (a model with another pipeline has its ONNX variants skipped). The tokenisation is checked to be
    identical to ``SentenceTransformer.preprocess`` on every batch before anything is timed. The export
    (``transformers.AutoModel`` from the model directory, float32, eager attention, dynamic batch and sequence
    axes, output ``last_hidden_state``) uses torch's TorchScript-based exporter (``dynamo=False``): the dynamo
    exporter needs ``onnxscript``, which ``hyprec[peers]`` does not install. It is cached under
    ``$HYPREC_CACHE/peers/<model>/`` (default ``~/.cache/hyprec``), keyed by model and torch version, and
    checked against the torch model once, when written.

    A peer that is not installed, whose execution provider is missing, or whose session cannot be created is
    skipped with one line, printed and written under the table; the rest of the run goes on. The ratio
    columns of a skipped reference read ``–``.

    Threads: every variant gets ``--threads`` (default: all usable cores): ``torch.set_num_threads`` for the
    torch-based ones, ``SessionOptions.intra_op_num_threads`` for ONNX Runtime, ``num_of_threads`` for the
    OpenVINO EP, and ``RAYON_NUM_THREADS`` for the tokenizers of all of them.

How to read the table
    * ``texts/s``: median over the timed passes; ``range`` is the slowest and fastest pass. Compare rows of one
      table (the ``vs`` columns are ratios) and trust only differences larger than the ranges.
    * ``vs ST f32`` / ``vs ORT+OV f32``: throughput relative to sentence-transformers float32 and to ONNX
      Runtime with OpenVINO at f32, the strongest float32 peer on Intel CPUs.
    * ``CPU s/pass``: median process CPU time (all threads) of a pass.
    * ``peak RSS MiB``: ``ru_maxrss`` of the variant's own process (the ONNX variants never import torch).
    * ``min cos``: the worst per-text cosine similarity to the sentence-transformers float32 embeddings; an
      ONNX float32 variant should be within about 1e-6 of 1. ``top-10``: mean overlap of each text's 10 nearest
      neighbours with those under sentence-transformers float32.
    * All variants are loaded at once (interleaving needs them warm): with MPNet, 1-2 GiB each, 15-20 GiB in
      all. Select fewer with ``--variants`` (substrings of the labels) on a small machine.

Usage
    .venv/bin/pip install -e '.[peers]'      # onnxruntime-openvino (CPU and OpenVINO EPs), onnx
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/peers.py --model minilm mpnet --repeats 3 \\
        --markdown benchmarks/results/peers.md
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/peers.py --model minilm --repeats 1 --limit 40    # smoke test
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from harness import (
    HYPREC_POLICIES,
    ST_REFERENCE,
    HyprecPolicy,
    Job,
    Measurement,
    SkipVariant,
    base_parser,
    cells,
    evaluation_texts,
    find,
    in_child,
    length_sorted_batches,
    log,
    machine_header,
    markdown_table,
    measure_model,
    notes,
    parse,
    speed_ratio,
    st_job,
    usable_cores,
    write_report,
)
from machine import load_average

#: hyprec's rows: the shared policies, then what ``LLM(model)`` picks by itself.
HYPREC: tuple[HyprecPolicy, ...] = (
    *HYPREC_POLICIES,
    HyprecPolicy("hyprec default", "auto", "auto", matmul_precision="auto"),
)

ST_DTYPES = ("float32", "bfloat16")  # sentence-transformers float32 is the reference
OPENVINO = "OpenVINOExecutionProvider"
OPSET = 17
INSTALL = "pip install 'hyprec[peers]'"


@dataclass(frozen=True)
class OrtVariant:
    label: str
    provider: str
    options: Mapping[str, str] = field(default_factory=dict)  # provider options (OpenVINO: num_of_threads added)
    precision: str = ""  # the policy column


ORT_VARIANTS: tuple[OrtVariant, ...] = (
    OrtVariant("ONNX Runtime CPU fp32", "CPUExecutionProvider", {}, "float32, CPU EP"),
    OrtVariant("ONNX Runtime+OpenVINO f32", OPENVINO, {"device_type": "CPU", "precision": "FP32"}, "FP32: hint f32"),
    OrtVariant("ONNX Runtime+OpenVINO default", OPENVINO, {"device_type": "CPU"}, "EP default"),
    OrtVariant(
        "ONNX Runtime+OpenVINO bf16 hint",
        OPENVINO,
        {"device_type": "CPU", "load_config": json.dumps({"CPU": {"INFERENCE_PRECISION_HINT": "bf16"}})},
        "hint bf16",
    ),
)
OV_REFERENCE = "ONNX Runtime+OpenVINO f32"


# --------------------------------------------------------------------------------------------------------
# The ONNX file and the pipeline around it (prepared once per model, in a child process)
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OnnxModel:
    """An exported transformer and what it takes to reproduce the sentence-transformers pipeline around it."""

    path: str
    tokenizer: str  # tokenizer.json of the model directory
    max_seq_length: int
    lowercase: bool
    pad_id: int
    pad_token: str
    inputs: tuple[str, ...]  # input_ids, attention_mask[, token_type_ids]
    normalize: bool  # a Normalize module follows the mean pooling
    exporter: str
    tokenization_check: str  # how the tokenisation was checked against sentence-transformers


@dataclass
class Prepared:
    texts: list[str]
    onnx: OnnxModel | None
    skip_reason: str = ""  # why every ONNX variant is skipped, where onnx is None


def first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def st_pipeline(model_dir: Path) -> tuple[bool, int, bool]:
    """``(normalize, max_seq_length, do_lower_case)`` of a Transformer -> mean Pooling [-> Normalize] model.

    Raises SkipVariant for any other pipeline: the ONNX variants reproduce only this one."""
    modules = json.loads((model_dir / "modules.json").read_text())
    kinds = [m["type"].rsplit(".", 1)[-1] for m in modules]
    if kinds not in (["Transformer", "Pooling"], ["Transformer", "Pooling", "Normalize"]):
        raise SkipVariant(f"the sentence-transformers pipeline is {' -> '.join(kinds)}; only mean pooling is mirrored")
    pooling = json.loads((model_dir / modules[1]["path"] / "config.json").read_text())
    modes = sorted(k for k, v in pooling.items() if k.startswith("pooling_mode_") and v is True)
    if modes != ["pooling_mode_mean_tokens"]:
        raise SkipVariant(f"the pooling is {modes}; only mean pooling is mirrored")
    config = json.loads((model_dir / "sentence_bert_config.json").read_text())
    return kinds[-1] == "Normalize", int(config["max_seq_length"]), bool(config.get("do_lower_case", False))


def cache_path(model: str, model_dir: Path, torch_version: str) -> Path:
    """``$HYPREC_CACHE/peers/<model>/torch-<version>.onnx``; a directory given as the model is keyed by its name
    and a hash of its path."""
    from hyprec.model_sources import cache_dir

    if Path(model).exists():
        key = f"{model_dir.name}-{hashlib.sha1(str(model_dir.resolve()).encode()).hexdigest()[:8]}"
    else:
        key = re.sub(r"[^A-Za-z0-9_.-]+", "--", model)
    return cache_dir() / "peers" / key / f"torch-{torch_version}.onnx"


def export_onnx(model_dir: Path, target: Path, tokenizer) -> dict[str, Any]:
    """Export the float32 transformer to ``target`` (atomically) and check it against torch; returns the
    metadata written beside it."""
    import inspect
    import warnings

    import onnxruntime as ort
    import torch
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(model_dir), dtype=torch.float32, attn_implementation="eager").eval()
    accepted = inspect.signature(model.forward).parameters
    names = tuple(n for n in ("input_ids", "attention_mask", "token_type_ids") if n in accepted)

    class LastHiddenState(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, *args):
            return self.model(**dict(zip(names, args, strict=True))).last_hidden_state

    # eval() on the wrapper: the exporter restores the wrapper's training flag, recursively, when it is done
    wrapper = LastHiddenState().eval()

    def encode(texts: list[str]) -> dict[str, torch.Tensor]:
        batch = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
        return {n: batch[n] if n in batch else torch.zeros_like(batch["input_ids"]) for n in names}

    # Traced on a padded batch, so no branch on "is there padding" is frozen to "no".
    example = encode(["The exported graph is traced on two texts of different lengths.", "Short."])
    partial = target.with_suffix(f".{os.getpid()}.part")
    target.parent.mkdir(parents=True, exist_ok=True)
    axes = {n: {0: "batch", 1: "sequence"} for n in (*names, "last_hidden_state")}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer and deprecation warnings of the TorchScript-based exporter
        torch.onnx.export(
            wrapper,
            tuple(example.values()),
            str(partial),
            input_names=list(names),
            output_names=["last_hidden_state"],
            dynamic_axes=axes,
            opset_version=OPSET,
            dynamo=False,
        )
    # Check another batch size and length (padded rows and a full one) against torch before caching.
    check = encode(["Three texts", "check the dynamic axes of the exported graph.", "a"])
    with torch.no_grad():
        expected = wrapper(*check.values()).numpy()
    session = ort.InferenceSession(str(partial), providers=["CPUExecutionProvider"])
    got = session.run(None, {n: t.numpy() for n, t in check.items()})[0]
    error = float(np.abs(got - expected).max())
    if not error < 1e-3:
        partial.unlink()
        raise SkipVariant(f"the ONNX export differs from torch by {error:.2e} (max abs); not cached")
    os.replace(partial, target)
    import transformers

    meta = {
        "exporter": f"torch.onnx.export, TorchScript-based (dynamo=False), opset {OPSET}",
        "torch": str(torch.__version__),
        "transformers": transformers.__version__,
        "inputs": list(names),
        "model_dir": str(model_dir),
        "max_abs_error_vs_torch": error,
    }
    target.with_suffix(".json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def check_tokenization(onnx: OnnxModel, model_dir: Path, texts: Sequence[str], batch_size: int) -> str:
    """Compare the ONNX variants' tokenisation with ``SentenceTransformer.preprocess`` on every batch."""
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        return "not checked against sentence-transformers (not installed)"
    st = SentenceTransformer(str(model_dir), device="cpu")
    tokenizer = make_tokenizer(onnx)
    for batch in length_sorted_batches(texts, batch_size):
        ours = tokenize(tokenizer, onnx, [texts[i] for i in batch])
        theirs = st.preprocess([texts[i] for i in batch])
        for name, array in ours.items():
            if name in theirs and not np.array_equal(array, theirs[name].numpy()):
                raise SkipVariant(f"its tokenisation differs from SentenceTransformer.preprocess ({name})")
    return f"identical to `SentenceTransformer.preprocess` on all {len(texts)} texts"


def prepare(model: str, n_texts: int, batch_size: int) -> Prepared:
    """Texts, and the ONNX file with its pipeline (exported unless cached); runs in a child process."""
    texts = evaluation_texts(n_texts)
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return Prepared(texts, None, f"onnxruntime is not installed ({INSTALL})")
    try:
        import torch
        from transformers import AutoTokenizer

        from hyprec.model_sources import resolve_model

        model_dir = resolve_model(model)
        normalize, max_seq_length, lowercase = st_pipeline(model_dir)
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), model_max_length=max_seq_length)
        path = cache_path(model, model_dir, str(torch.__version__))
        if path.exists() and path.with_suffix(".json").exists():
            meta = json.loads(path.with_suffix(".json").read_text())
            log(f"[{model}] ONNX export cached: {path}")
        else:
            log(f"[{model}] exporting to ONNX: {path}")
            meta = export_onnx(model_dir, path, tokenizer)
        onnx = OnnxModel(
            path=str(path),
            tokenizer=str(model_dir / "tokenizer.json"),
            max_seq_length=max_seq_length,
            lowercase=lowercase,
            pad_id=int(tokenizer.pad_token_id),
            pad_token=str(tokenizer.pad_token),
            inputs=tuple(meta["inputs"]),
            normalize=normalize,
            exporter=meta["exporter"],
            tokenization_check="",
        )
        check = check_tokenization(onnx, model_dir, texts, batch_size)
    except SkipVariant as exc:
        return Prepared(texts, None, str(exc))
    except Exception as exc:  # a missing package, a failed export: the ONNX rows go, the rest runs
        return Prepared(texts, None, f"preparing the ONNX model failed: {type(exc).__name__}: {first_line(exc)}")
    return Prepared(texts, replace(onnx, tokenization_check=check))


# --------------------------------------------------------------------------------------------------------
# ONNX Runtime variants (in their own processes; they never import torch)
# --------------------------------------------------------------------------------------------------------


def make_tokenizer(onnx: OnnxModel):
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(onnx.tokenizer)
    tokenizer.enable_truncation(max_length=onnx.max_seq_length, strategy="longest_first")
    tokenizer.enable_padding(pad_id=onnx.pad_id, pad_token=onnx.pad_token)  # to the longest text of the batch
    return tokenizer


def tokenize(tokenizer, onnx: OnnxModel, texts: Sequence[str]) -> dict[str, np.ndarray]:
    encodings = tokenizer.encode_batch([t.lower() for t in texts] if onnx.lowercase else list(texts))
    fields = {"input_ids": "ids", "attention_mask": "attention_mask", "token_type_ids": "type_ids"}
    return {n: np.array([getattr(e, fields[n]) for e in encodings], dtype=np.int64) for n in onnx.inputs}


def mean_pool(hidden: np.ndarray, mask: np.ndarray, normalize: bool) -> np.ndarray:
    """sentence-transformers' mean Pooling (sum over real tokens / their count, at least 1e-9), then its
    Normalize (``F.normalize``: divide by the L2 norm, at least 1e-12)."""
    weights = mask[:, :, None].astype(hidden.dtype)
    pooled = (hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)
    if normalize:
        pooled /= np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
    return pooled


def openvino_version(ort) -> str:
    """The OpenVINO runtime the onnxruntime-openvino wheel bundles (``capi/libopenvino.so.X.Y.Z``)."""
    names = [p.name for p in (Path(ort.__file__).parent / "capi").glob("libopenvino.so.*.*.*")]
    return names[0].removeprefix("libopenvino.so.") if names else "not bundled"


class OrtRunner:
    """The exported model on one ONNX Runtime execution provider, inside the sentence-transformers pipeline."""

    def __init__(self, texts: Sequence[str], batch_size: int, threads: int, onnx: OnnxModel, variant: OrtVariant):
        try:
            import onnxruntime as ort
        except ImportError:
            raise SkipVariant(f"onnxruntime is not installed ({INSTALL})") from None
        available = ort.get_available_providers()
        if variant.provider not in available:
            raise SkipVariant(
                f"{variant.provider} is not in onnxruntime.get_available_providers() {available}: install the "
                "onnxruntime-openvino wheel (hyprec[peers]) instead of onnxruntime; the onnxruntime-ep-openvino "
                "plugin is not used (it refuses non-Intel CPUs)"
            )
        options = dict(variant.options)
        if variant.provider == OPENVINO:
            options["num_of_threads"] = str(threads)
        session_options = ort.SessionOptions()
        session_options.intra_op_num_threads = threads
        session_options.log_severity_level = 3  # errors only
        try:
            self.session = ort.InferenceSession(onnx.path, session_options, providers=[(variant.provider, options)])
        except Exception as exc:
            raise SkipVariant(f"{variant.provider} could not create a session: {first_line(exc)}") from None
        if self.session.get_providers()[0] != variant.provider:  # ORT falls back to the CPU EP with a warning
            raise SkipVariant(f"{variant.provider} could not be created with {options}; ORT fell back to the CPU EP")
        self.texts, self.onnx = list(texts), onnx
        self.tokenizer = make_tokenizer(onnx)
        self.batches = length_sorted_batches(self.texts, batch_size)
        self.policy, self.threads = variant.precision, threads
        self.versions = {"onnxruntime": ort.__version__}
        if variant.provider == OPENVINO:
            self.versions["OpenVINO (bundled)"] = openvino_version(ort)
        self.real = self.padded = 0
        try:  # a provider may accept its options and fail only when it first compiles or runs the graph
            self.session.run(["last_hidden_state"], tokenize(self.tokenizer, onnx, self.texts[:2]))
        except Exception as exc:
            raise SkipVariant(f"{variant.provider} failed on its first batch: {first_line(exc)}") from None

    def embed(self) -> np.ndarray:
        parts, self.real, self.padded = [], 0, 0
        for batch in self.batches:
            feeds = tokenize(self.tokenizer, self.onnx, [self.texts[i] for i in batch])
            mask = feeds["attention_mask"]
            self.real, self.padded = self.real + int(mask.sum()), self.padded + mask.size
            hidden = self.session.run(["last_hidden_state"], feeds)[0]
            parts.append(mean_pool(hidden, mask, self.onnx.normalize))
        pooled = np.concatenate(parts)
        out = np.empty_like(pooled)
        out[np.concatenate(self.batches)] = pooled  # back to the input order
        return out

    def padding(self) -> tuple[float, int]:
        return 1.0 - self.real / self.padded, len(self.batches)


def load_ort(texts: Sequence[str], batch_size: int, threads: int, onnx: OnnxModel, variant: OrtVariant) -> OrtRunner:
    return OrtRunner(texts, batch_size, threads, onnx, variant)


# --------------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------------


def jobs(model: str, prepared: Prepared, batch_size: int, threads: int) -> list[Job]:
    """Every variant, the ONNX ones only where the export is there (see ``prepared.skip_reason``)."""
    texts = prepared.texts
    out = [st_job(model, texts, threads, batch_size, dtype) for dtype in ST_DTYPES]
    if prepared.onnx is not None:
        kwargs = {"texts": texts, "batch_size": batch_size, "threads": threads, "onnx": prepared.onnx}
        out += [Job(v.label, load_ort, {**kwargs, "variant": v}) for v in ORT_VARIANTS]
    return out + [policy.job(model, texts, threads) for policy in HYPREC]


HEADER = (
    "variant",
    "policy / precision",
    "texts/s",
    "range",
    "vs ST f32",
    "vs ORT+OV f32",
    "CPU s/pass",
    "peak RSS MiB",
    "min cos vs ST f32",
    "top-10",
)


def model_table(model: str, results: list[Measurement], skipped: list[str], prepared: Prepared) -> list[str]:
    st, ov = find(results, ST_REFERENCE), find(results, OV_REFERENCE)
    rows = []
    for r in results:
        c = cells(r, st)
        rows.append([*(c[k] for k in ("variant", "policy", "texts/s", "range", "vs ref")), speed_ratio(r, ov)])
        rows[-1] += [c[k] for k in ("CPU s/pass", "peak RSS MiB", "min cos", "top-10")]
    lines = ["", f"## {model}", ""]
    if prepared.onnx:
        lines += [f"ONNX: {prepared.onnx.exporter}; tokenisation {prepared.onnx.tokenization_check}.", ""]
    return lines + markdown_table(HEADER, rows) + notes(results, skipped)


def header(args: argparse.Namespace, results: list[Measurement], load_at_start: str) -> list[str]:
    versions: dict[str, str] = {}
    for r in results:
        versions.update(r.versions)
    off = sorted({f"{r.label} ({r.threads})" for r in results if r.threads != args.threads})
    n_texts = results[0].n_texts if results else args.texts
    facts = [
        f"threads: {args.threads} in every variant (torch.set_num_threads, ONNX Runtime intra_op_num_threads, "
        f"OpenVINO num_of_threads, RAYON_NUM_THREADS for the tokenizers)"
        + (f"; reported otherwise by: {', '.join(off)}" if off else ""),
        "versions: " + ", ".join(f"{k} {v}" for k, v in sorted(versions.items())),
        f"{n_texts} texts (`hyprec.texts.evaluation_texts`); one warm-up pass, then the median of {args.repeats} "
        f"timed passes taken in interleaved rounds; batch size {args.batch_size} (sentence-transformers, ONNX)",
        f"date: {time.strftime('%Y-%m-%d %H:%M %Z')}",
    ]
    return machine_header("Embedding throughput: hyprec vs its peers", facts, load_at_start)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = base_parser(__doc__, usable_cores(), "threads in every variant (default: all usable cores)")
    parser.add_argument("--variants", nargs="+", help="run only the variants whose label contains one of these")
    return parse(parser, argv, min_threads=1)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ["RAYON_NUM_THREADS"] = str(args.threads)  # inherited by every variant's process
    load_at_start = load_average()
    tables: list[str] = []
    report = ""
    for model in args.model:
        prepared = in_child(prepare, model, args.texts, args.batch_size)
        onnx_skipped = []
        if prepared.onnx is None:
            onnx_skipped = [f"{v.label}: skipped, {prepared.skip_reason}" for v in ORT_VARIANTS]
            log(f"[{model}] ONNX Runtime variants skipped: {prepared.skip_reason}")
        selected = [j for j in jobs(model, prepared, args.batch_size, args.threads) if chosen(args, j.label)]
        results, skipped = measure_model(model, selected, args.repeats)
        skipped = sorted(skipped + [line for line in onnx_skipped if chosen(args, line.split(":")[0])], key=rank)
        tables += model_table(model, results, skipped, prepared)
        report = "\n".join(header(args, results, load_at_start) + tables) + "\n"
        write_report(args.markdown, report)
    print(report)


def rank(skip_line: str) -> int:
    """Position of a skip line's variant in the table order."""
    labels = [f"sentence-transformers {d}" for d in ST_DTYPES] + [v.label for v in ORT_VARIANTS + HYPREC]
    return next((i for i, label in enumerate(labels) if skip_line.startswith(f"{label}:")), len(labels))


def chosen(args: argparse.Namespace, label: str) -> bool:
    return not args.variants or any(s in label for s in args.variants)


if __name__ == "__main__":
    main()
