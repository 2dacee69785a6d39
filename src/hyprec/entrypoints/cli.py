"""The ``hyprec`` command line: ``embed``, ``score``, ``rerank``, ``classify``, ``generate``, ``chat``, ``info``,
``check``, ``compare``, ``repair``, ``serve`` and ``embed-dataset``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from hyprec.dtypes import (
    ATTN_DTYPES,
    DTYPES,
    FLOAT32_GEMMS,
    HALF_ARITHMETIC,
    KV_CACHE_DTYPES,
    MATMUL_PRECISIONS,
    WEIGHTS,
)
from hyprec.errors import HyprecError, InvalidInputError
from hyprec.output_files import check_output_file, write_output

PROGRESS_THRESHOLD = 256  # show a progress bar for inputs with more texts than this
EMBEDDING_SUFFIXES = (".npy", ".jsonl")
RESULT_SUFFIXES = (".jsonl",)  # score, rerank, classify: records, one JSON object a line
SUMMARY_ROWS = 8  # texts (and cosine-matrix rows) the terminal summary of `hyprec embed` shows
CHECK_FOUND_NON_FINITE = 3  # exit status of `hyprec check` on NaN/inf weights (like repair missing its tolerance)
INTERRUPTED = 130  # exit status after Ctrl-C, as shells report 128 + SIGINT


def read_texts(path: Path) -> list[str]:
    """Texts from a ``.txt`` file (one per line) or a ``.jsonl`` file (JSON strings or objects with "text")."""
    if path.suffix not in (".txt", ".jsonl"):
        raise InvalidInputError(f"--input {path}: expected a .txt or .jsonl file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise InvalidInputError(f"--input {path}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInputError(f"--input {path}: cannot read as UTF-8 text: {exc}") from None
    if path.suffix == ".txt":
        return lines
    texts = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InvalidInputError(f"{path}:{n}: invalid JSON ({exc.msg})") from None
        if isinstance(item, dict):
            item = item.get("text")
        if not isinstance(item, str):
            raise InvalidInputError(f'{path}:{n}: expected a JSON string or an object with a "text" string field')
        texts.append(item)
    return texts


def write_json_lines(records: Iterable[dict[str, Any]], output: Path | None) -> None:
    """Each record as a line of JSON, on stdout (``output`` None) or in the file ``output``."""
    if output is None:
        sys.stdout.writelines(json.dumps(r) + "\n" for r in records)
        return
    with open(output, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def write_embeddings(vectors: np.ndarray, output: Path | None) -> None:
    """JSON lines ``{"index", "embedding"}`` on stdout (``output`` None), or a ``.npy`` / ``.jsonl`` file."""
    if output is not None and output.suffix == ".npy":
        np.save(output, vectors)
    elif output is None or output.suffix == ".jsonl":
        write_json_lines(({"index": i, "embedding": v.tolist()} for i, v in enumerate(vectors)), output)
    else:
        raise InvalidInputError(f"--output {output}: expected a .npy or .jsonl file")


def embedding_summary(texts: list[str], vectors: np.ndarray, policy: str) -> str:
    """What `hyprec embed` shows on a terminal instead of hundreds of raw floats: the shape and policy, each
    text's norm and first values, and the texts' pairwise cosine similarity."""
    rows = min(len(texts), SUMMARY_ROWS)
    norms = np.linalg.norm(vectors, axis=1)
    lines = [f"{vectors.shape[0]} x {vectors.shape[1]} float32 embeddings ({policy})"]
    for i in range(rows):
        head = ", ".join(f"{x:+.4f}" for x in vectors[i, :4])
        lines.append(f"  [{i}] {texts[i][:48]!r:<52} norm {norms[i]:.4f}  [{head}, ...]")
    if len(texts) > rows:
        lines.append(f"  ... and {len(texts) - rows} more")
    if rows > 1:
        unit = vectors[:rows] / np.maximum(norms[:rows, None], np.finfo(np.float32).tiny)
        cosine = unit @ unit.T
        lines.append("cosine similarity")
        lines.append("       " + "".join(f"{f'[{j}]':>8}" for j in range(rows)))
        lines += [f"  {f'[{i}]':<5}" + "".join(f"{c:>8.4f}" for c in cosine[i]) for i in range(rows)]
    lines.append("(the vectors: --output FILE.npy|.jsonl, --json, or pipe the output for JSON lines)")
    return "\n".join(lines)


def results_table(title: str, records: list[dict[str, Any]], texts: list[str]) -> str:
    """What `hyprec score`, `rerank` and `classify` show on a terminal: ``title``, then a row per record, its
    numbers rounded, ending with the start of the text it is about (``texts[record["index"]]``)."""
    keys = [k for k in records[0] if k != "document"]  # the text column shows every document already
    rows = [keys, *([_cell(r[k]) for k in keys] for r in records)]
    widths = [max(len(row[j]) for row in rows) for j in range(len(keys))]
    ends = ["text", *(repr(texts[r["index"]][:60]) for r in records)]
    lines = ["  " + "  ".join(map(str.rjust, row, widths)) + "  " + end for row, end in zip(rows, ends, strict=True)]
    return "\n".join([title, *lines])


def _cell(value: Any) -> str:
    """A value of :func:`results_table`: numbers to 4 decimals (a list of them space-separated)."""
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, list):
        return " ".join(map(_cell, value))
    return str(value)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to help texts that do not state their default already; None and False (an unset
    option, an off flag) say nothing worth printing."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default" in text or action.default is None or action.default is False:
            return text
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """hyprec's parsers (subcommands inherit the class): defaults in the help, and ``-q`` accepted before the
    subcommand and after it. A subcommand's ``-q`` defaults to SUPPRESS so that it never resets a ``-q`` given
    before the subcommand."""

    def __init__(self, *args, quiet_default: object = argparse.SUPPRESS, **kwargs) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)
        self.add_argument(
            "-q", "--quiet", action="store_true", default=quiet_default, help="only print results, warnings and errors"
        )
        self._intermixing = False

    def parse_known_args(self, args=None, namespace=None):
        """Subcommands parse their arguments intermixed, so that TEXT arguments may follow options (`hyprec score
        MODEL --query Q DOC...`): plain argparse fills MODEL and an empty TEXT list at the first positional and then
        rejects the DOCs. The top parser keeps plain parsing (argparse cannot intermix around subcommands)."""
        if self._subparsers is not None or self._intermixing:
            return super().parse_known_args(args, namespace)
        self._intermixing = True  # parse_known_intermixed_args runs parse_known_args itself
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False


def _flag(name: str) -> str:
    """The option that sets keyword argument ``name`` (``max_tokens``: ``--max-tokens``). Options passed on under
    their own names are declared in the tables below by name alone, so name and option cannot drift apart."""
    return "--" + name.replace("_", "-")


def _add_options(p: argparse.ArgumentParser, options: dict[str, dict[str, Any]]) -> None:
    """Add ``options`` (keyword name: ``add_argument`` keywords) to ``p``, each as ``_flag(name)``."""
    for name, spec in options.items():
        p.add_argument(_flag(name), **spec)


def _values(args: argparse.Namespace, options: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The keyword arguments ``options`` (added by :func:`_add_options`) ask for: their parsed values by name."""
    return {name: getattr(args, name) for name in options}


def _auto_option(choices: tuple[str, ...], effect: str = "") -> dict[str, Any]:
    """A precision setting that defaults to "auto": its help names the choices, then what it decides."""
    accepts = f"one of {', '.join(choices)}"
    return {"default": "auto", "help": f"{accepts}: {effect}" if effect else accepts}


_POLICY_OPTIONS = {  # the dtype policy: hyprec.LLM keyword arguments
    "dtype": _auto_option(DTYPES),
    "attn_dtype": _auto_option(ATTN_DTYPES),
    "kv_cache_dtype": _auto_option(KV_CACHE_DTYPES),
    "matmul_precision": _auto_option(
        MATMUL_PRECISIONS,
        "how float32 linear layers multiply (highest: float32 GEMMs; high: three bfloat16 products, float32-grade; "
        "medium: one); auto picks high where it was measured faster",
    ),
    "float32_gemm": _auto_option(
        FLOAT32_GEMMS,
        "the library of float32 GEMMs (torch: F.linear; onednn: prepacked weights, fused activations); auto picks "
        "oneDNN for encoders where it was measured faster",
    ),
    "weights": _auto_option(
        WEIGHTS,
        "keep the weights a GGUF file stores in blocks as stored (stored: multiplied with float32 activations) or "
        "dequantise them at load (float32); auto: stored where it applies",
    ),
}

_SAMPLING_OPTIONS = {  # `generate` and `chat`: SamplingParams fields
    "max_tokens": {"type": int, "default": 64, "help": "most tokens to generate"},
    "temperature": {"type": float, "default": 0.0, "help": "0 = greedy (default)"},
    "top_p": {"type": float, "default": 1.0, "help": "nucleus sampling: smallest set of tokens with this mass"},
    "top_k": {"type": int, "default": 0, "help": "sample among the k likeliest tokens (0: all)"},
    "min_p": {"type": float, "default": 0.0, "help": "drop tokens below this fraction of the likeliest's p"},
    "seed": {"type": int, "help": "random seed (default: unseeded)"},
    "stop": {"action": "append", "default": None, "help": "stop string (repeatable)"},
    "repetition_penalty": {"type": float, "default": 1.0, "help": "> 1 discourages repeated tokens"},
}

_SERVER_LIMITS_HELP = {  # `serve`: ServerSettings limits, whose rules and defaults ServerSettings holds
    "max_concurrent_requests": "429 beyond this many (counted once a request's body is in)",
    "max_inputs_per_request": "413 beyond this many inputs",
    "max_input_tokens": "400 for longer inputs (default: the model's limit)",
    "request_timeout": "seconds; 504 beyond",
    "max_body_bytes": "413 for larger bodies",
    "body_timeout": "seconds to send a request body; 408 beyond",
    "chat_template_timeout": "seconds a chat template may take to render; 400 beyond",
    "shutdown_timeout": "seconds open requests get after SIGTERM/SIGINT; then they end with an error",
}


def _add_model_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None, help="model directory, .gguf file or alias (default: minilm)")


def _add_embedding_model_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model directory or alias (default: minilm)")


def _add_engine_options(p: argparse.ArgumentParser) -> None:
    """The options :func:`_llm_options` turns into :class:`hyprec.LLM` keyword arguments."""
    _add_options(p, _POLICY_OPTIONS)
    _add_device_option(p)
    p.add_argument("--precision-plan", type=Path, help="a plan written by `hyprec repair` (sets every dtype)")
    p.add_argument(
        "--deterministic",
        action="store_true",
        help="batch invariance: each input's result is bit-identical whatever it is batched with (slower)",
    )


def _add_device_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")


def _add_half_arithmetic_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--half-arithmetic",
        **_auto_option(
            HALF_ARITHMETIC,
            "auto emulates float16/bfloat16 in float32 (rounding to the format) where this device has no hardware "
            "path for it, which gives the same numbers at float32 speed",
        ),
    )


def _add_texts_option(p: argparse.ArgumentParser, what: str = "calibration texts") -> None:
    """``--texts``, read by :func:`_texts_option`."""
    p.add_argument("--texts", type=Path, help=f"{what} (.txt or .jsonl); default: built-in real text")


def _add_json_option(p: argparse.ArgumentParser, text: str) -> None:
    p.add_argument("--json", action="store_true", help=text)


def _add_inputs(p: argparse.ArgumentParser, what: str = "texts", role: str = "to embed") -> None:
    """``what`` (plural) as arguments (TEXT for texts) and from ``--input FILE``, read together by
    :func:`_input_texts`."""
    one = what.removesuffix("s")
    p.add_argument("texts", nargs="*", metavar=one.upper(), help=f"{what} {role} (before those of --input)")
    p.add_argument("--input", type=Path, help=f".txt (one {one} per line) or .jsonl")
    p.set_defaults(inputs_are=what)


def _add_output_options(p: argparse.ArgumentParser, suffixes: tuple[str, ...]) -> None:
    """``--output`` (a file with one of ``suffixes``) and ``--json``: where :func:`_write_results` sends results."""
    p.add_argument(
        "--output",
        type=Path,
        help=f"{' or '.join(suffixes)} (default: JSON lines on stdout when piped, a readable summary on a terminal)",
    )
    _add_json_option(p, "JSON lines on stdout even on a terminal")
    p.set_defaults(output_suffixes=suffixes)


def _add_classifier_argument(p: argparse.ArgumentParser, kind: str) -> None:
    """The MODEL of `score`, `rerank` and `classify`: required, since an optional one would take the first TEXT."""
    p.add_argument("model", metavar="MODEL", help=f"{kind}: model directory or alias")


def _add_generation_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default="gemma",
        help="model directory, .gguf file or alias (default: gemma, Gemma-3-270M base: not instruction-tuned)",
    )
    _add_engine_options(p)
    _add_options(p, _SAMPLING_OPTIONS)
    p.add_argument("--max-model-len", type=int, help="context window (default: the model's, at most 8192 on CPU)")


def _sampling_params(args: argparse.Namespace):
    from hyprec.sampling_params import SamplingParams

    return SamplingParams(**_values(args, _SAMPLING_OPTIONS))


def build_parser() -> argparse.ArgumentParser:
    """The ``hyprec`` parser: a subparser per command, each given the option groups it takes."""
    parser = _Parser(prog="hyprec", description="Hybrid-precision inference engine.", quiet_default=False)
    sub = parser.add_subparsers(dest="command", required=True)  # subcommands are _Parser too
    _add_embed_command(sub)
    _add_scoring_commands(sub)
    _add_generation_commands(sub)
    _add_check_command(sub)
    _add_compare_command(sub)
    _add_repair_command(sub)
    _add_serve_command(sub)
    _add_embed_dataset_command(sub)
    _add_info_command(sub)
    return parser


def _add_embed_command(sub: argparse._SubParsersAction) -> None:
    embed = sub.add_parser("embed", help="embed texts (arguments, --input file)")
    _add_inputs(embed)
    _add_embedding_model_option(embed)
    _add_engine_options(embed)
    _add_output_options(embed, EMBEDDING_SUFFIXES)
    embed.add_argument("--dimensions", type=int, help="Matryoshka truncation (re-normalised; default: all)")
    embed.add_argument("--prompt-name", help="a prompt defined by the model (encoders; default: the model's own)")
    embed.add_argument("--batch-size", type=int, help="most texts per forward pass (default: the token budget's)")
    embed.add_argument(
        "--no-normalize",
        dest="normalize",
        action="store_false",
        default=None,
        help="skip the model's Normalize step",
    )


def _add_scoring_commands(sub: argparse._SubParsersAction) -> None:
    score = sub.add_parser("score", help="score documents against a query (cross-encoder, or embeddings' cosine)")
    rerank = sub.add_parser("rerank", help="order documents by their score against a query, best first")
    for p in (score, rerank):
        _add_classifier_argument(p, "a cross-encoder (one label), or an embedding model (cosine similarity)")
        p.add_argument("--query", required=True, help="the query every document is scored against")
        _add_inputs(p, "documents", "to score")
    rerank.add_argument("--top-n", type=int, help="keep the best N documents (default: all)")
    rerank.add_argument("--return-documents", action="store_true", help="include each document in its result")
    classify = sub.add_parser("classify", help="label texts with a sequence-classification model")
    _add_classifier_argument(classify, "a sequence-classification model")
    _add_inputs(classify, "texts", "to classify")
    for p in (score, rerank, classify):
        _add_engine_options(p)
        _add_output_options(p, RESULT_SUFFIXES)


def _add_generation_commands(sub: argparse._SubParsersAction) -> None:
    gen = sub.add_parser("generate", help="complete a prompt with a generative model")
    gen.add_argument("prompt", metavar="PROMPT", help="the text to complete")
    _add_generation_options(gen)

    chat = sub.add_parser(
        "chat",
        help="chat on stdin/stdout: one user message per line; EOF or /exit ends",
        description="Chat on stdin/stdout: one user message per line; EOF or /exit ends. The default model, the "
        "`gemma` alias, is Gemma-3-270M *base*: it is not instruction-tuned, so it continues text rather than "
        "following instructions; pass an instruction-tuned model (--model DIR|FILE.gguf) for real conversations.",
    )
    chat.add_argument("--system", help="a system message opening the conversation")
    _add_generation_options(chat)


def _add_check_command(sub: argparse._SubParsersAction) -> None:
    check = sub.add_parser(
        "check",
        help="precision risk report: will this model overflow in float16/bfloat16?",
        description="Precision risk report: will this model overflow in float16/bfloat16? Exit status 0 with a "
        f"report, 2 on bad input, {CHECK_FOUND_NON_FINITE} when weights or float32 activations are NaN/inf (then "
        "every policy fails).",
    )
    _add_model_argument(check)
    _add_texts_option(check)
    _add_json_option(check, "print the report as JSON")
    check.add_argument("--plot", type=Path, help="write a per-layer max-|x| chart (PNG)")
    _add_device_option(check)


def _add_compare_command(sub: argparse._SubParsersAction) -> None:
    comp = sub.add_parser("compare", help="run dtype policies against a reference on real text")
    _add_model_argument(comp)
    comp.add_argument("--policies", nargs="+", help="default: float32 hybrid-fp16 hybrid-bf16 float16 bfloat16")
    comp.add_argument(
        "--reference",
        default="float32",
        help="what the policies are measured against: float32 (hyprec's own), sentence-transformers or transformers",
    )
    _add_texts_option(comp, "texts (a cross-encoder's documents, scored against built-in queries)")
    _add_json_option(comp, "print JSON instead of Markdown")
    comp.add_argument("--precision-plan", type=Path, help="also run this plan (from `hyprec repair`)")
    _add_device_option(comp)
    _add_half_arithmetic_option(comp)


def _add_repair_command(sub: argparse._SubParsersAction) -> None:
    rep = sub.add_parser("repair", help="search a precision plan: as much as possible in float16/bfloat16")
    _add_model_argument(rep)
    rep.add_argument("--target", default="float16", help="float16 (default) or bfloat16")
    rep.add_argument(
        "--tolerance",
        type=float,
        help="least top-1 agreement with float32 (decoders, default 0.995) or least cosine (encoders, 0.9999)",
    )
    rep.add_argument(
        "--search-margin",
        type=float,
        help="accept candidates only at tolerance + margin (default: one standard error of the top-1 rate)",
    )
    _add_texts_option(rep)
    rep.add_argument("--max-tokens", type=int, default=256, help="tokens per calibration text (decoders)")
    rep.add_argument("--output", type=Path, default=Path("precision-plan.json"), help="plan file (.json)")
    _add_json_option(rep, "print the plan as JSON")
    _add_device_option(rep)
    _add_half_arithmetic_option(rep)


def _add_serve_command(sub: argparse._SubParsersAction) -> None:
    from hyprec.serving.settings import API_KEY_ENV, COUNT, LIMITS, PORT, ServerSettings

    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server (embeddings, completions, chat)")
    _add_model_argument(serve)
    _add_engine_options(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    serve.add_argument("--port", type=PORT, default=8000, help="TCP port, 1..65535")
    serve.add_argument(
        "--served-model-name", help="the name clients use (default: the alias, or the model's file/directory name)"
    )
    serve.add_argument(
        "--api-key",
        help=f"require 'Authorization: Bearer KEY' on the API routes (see also --api-key-file, ${API_KEY_ENV})",
    )
    serve.add_argument(
        "--api-key-file", type=Path, help=f"read the API key from this file's first line (or set ${API_KEY_ENV})"
    )
    defaults = ServerSettings("-")
    limits = {
        name: {"type": LIMITS[name], "default": getattr(defaults, name), "help": text}
        for name, text in _SERVER_LIMITS_HELP.items()
    }
    _add_options(serve, limits)
    serve.add_argument(
        "--max-num-batched-tokens",
        type=COUNT,
        help="token budget of a forward pass (default: 16384 for generation, 2048 for embeddings on a CPU)",
    )
    serve.add_argument("--max-model-len", type=COUNT, help="context window (generative models)")


def _add_embed_dataset_command(sub: argparse._SubParsersAction) -> None:
    eds = sub.add_parser("embed-dataset", help="embed a .jsonl/.parquet file's text column on Ray actors")
    eds.add_argument("--input", type=Path, required=True, help=".jsonl (JSON objects) or .parquet")
    eds.add_argument("--output", type=Path, required=True, help="directory; writes embeddings.parquet there")
    _add_embedding_model_option(eds)
    _add_engine_options(eds)
    eds.add_argument("--column", default="text", help="the text column (default: text)")
    eds.add_argument("--ray-address", default="local", help="'local' (default) or a Ray cluster address")
    eds.add_argument("--concurrency", type=int, default=2, help="actors, one engine each")
    eds.add_argument("--batch-size", type=int, default=256, help="rows per actor call")
    eds.add_argument(
        "--num-cpus-per-actor",
        type=float,
        help="CPUs Ray reserves for each actor (default: sized to the runtime, at most 1, leaving room to read)",
    )


def _add_info_command(sub: argparse._SubParsersAction) -> None:
    info = sub.add_parser("info", help="architecture, sizes, resolved policy and pooling pipeline")
    _add_model_argument(info)
    _add_engine_options(info)
    _add_json_option(info, "print JSON")


def _llm_options(args: argparse.Namespace) -> dict[str, object]:
    """The :class:`hyprec.LLM` keyword arguments a subcommand's engine options ask for (with its context window and
    token budget where it has those options)."""
    options: dict[str, object] = {**_values(args, _POLICY_OPTIONS), "device": args.device}
    if args.deterministic:
        options["deterministic"] = True
    for name in ("max_model_len", "max_num_batched_tokens", "precision_plan"):
        if getattr(args, name, None) is not None:
            options[name] = getattr(args, name)
    return options


def load_llm(args: argparse.Namespace, model: str | None):
    """The :class:`hyprec.LLM` every subcommand runs: ``model`` (None: the default model) under the engine options
    ``args`` asks for. The one place the command line loads a model."""
    from hyprec.entrypoints.llm import LLM  # imported late: `hyprec --help` stays fast

    return LLM(model, **_llm_options(args))


def _load_generator(args: argparse.Namespace):
    """The model of `generate`/`chat`; an embedding model gets an error that names the command it needs."""
    llm = load_llm(args, args.model)
    if not llm.is_generative:
        raise InvalidInputError(
            f"{args.model} is an embedding model: embed texts with `hyprec embed --model {args.model} TEXT...`; "
            f"`hyprec {args.command}` needs a generative model (.gguf file, decoder directory, or the gemma alias)"
        )
    return llm


def cmd_generate(args: argparse.Namespace) -> None:
    params = _sampling_params(args)
    llm = _load_generator(args)
    printed = ""
    for out in llm.stream(args.prompt, params):
        text = out.outputs[0].text
        sys.stdout.write(text[len(printed) :])
        sys.stdout.flush()
        printed = text
    sys.stdout.write("\n")


def cmd_chat(args: argparse.Namespace) -> None:
    params = _sampling_params(args)
    llm = _load_generator(args)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            sys.stdout.write("> ")
            sys.stdout.flush()
        line = sys.stdin.readline()
        if not line or line.strip() == "/exit":
            return
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.strip()})
        reply = llm.chat(messages, params)[0].outputs[0].text.strip()
        messages.append({"role": "assistant", "content": reply})
        print(reply, flush=True)


def _input_texts(args: argparse.Namespace) -> list[str]:
    """The texts of the TEXT arguments, then those of ``--input`` (:func:`_add_inputs`); with the ``--output`` path
    checked too (:func:`_add_output_options`): what can go wrong before the model loads, found before it loads."""
    texts = list(args.texts)
    if args.input is not None:
        texts += read_texts(args.input)
    if not texts:
        one = args.inputs_are.removesuffix("s").upper()
        raise InvalidInputError(f"no {args.inputs_are}: give {one} arguments or --input FILE")
    if args.output is not None:
        check_output_file(args.output, "--output", args.output_suffixes)
    return texts


def _write_results(
    args: argparse.Namespace, what: str, count: str, write: Callable[[Path | None], None], summary: Callable[[], str]
) -> None:
    """Send the results (``count`` ``what``: "3 x 384", "embeddings") where the output options ask: to the
    ``--output`` file (``write(path)``), to a person at a terminal as ``summary()`` (unless ``--json``), or as JSON
    lines on stdout (``write(None)``)."""
    if args.output is not None:
        write_output(args.output, write, f"the {what}")
        print(f"wrote {count} {what} to {args.output}", file=sys.stderr)
    elif sys.stdout.isatty() and not args.json:  # a person reads this: raw JSON helps no one
        print(summary())
    else:
        write(None)


def cmd_embed(args: argparse.Namespace) -> None:
    texts = _input_texts(args)
    llm = load_llm(args, args.model)
    vectors = llm.embed(
        texts,
        normalize=args.normalize,
        dimensions=args.dimensions,
        prompt_name=args.prompt_name,
        batch_size=args.batch_size,
        show_progress=len(texts) > PROGRESS_THRESHOLD and not args.quiet,
    )
    _write_results(
        args,
        "embeddings",
        f"{vectors.shape[0]} x {vectors.shape[1]}",
        lambda path: write_embeddings(vectors, path),
        lambda: embedding_summary(texts, vectors, llm.policy.name),
    )


def _write_records(
    args: argparse.Namespace, what: str, records: list[dict[str, Any]], texts: list[str], title: str
) -> None:
    """:func:`_write_results` for `score`, `rerank` and `classify`: ``records`` as JSON lines, or as
    :func:`results_table` under ``title`` on a terminal."""
    _write_results(
        args,
        what,
        str(len(records)),
        lambda path: write_json_lines(records, path),
        lambda: results_table(title, records, texts),
    )


def cmd_score(args: argparse.Namespace) -> None:
    docs = _input_texts(args)
    llm = load_llm(args, args.model)
    scores = llm.score(args.query, docs)
    records = [{"index": i, "score": float(s)} for i, s in enumerate(scores)]
    _write_records(args, "scores", records, docs, f"{len(docs)} scores against {args.query!r} ({llm.policy.name})")


def cmd_rerank(args: argparse.Namespace) -> None:
    docs = _input_texts(args)
    llm = load_llm(args, args.model)
    results = llm.rerank(args.query, docs, top_n=args.top_n, return_documents=args.return_documents)
    records = [{k: v for k, v in asdict(r).items() if v is not None} for r in results]  # no null documents
    title = f"{len(records)} of {len(docs)} documents, best first, for {args.query!r} ({llm.policy.name})"
    _write_records(args, "results", records, docs, title)


def cmd_classify(args: argparse.Namespace) -> None:
    texts = _input_texts(args)
    llm = load_llm(args, args.model)
    records = [{"index": i, **asdict(out)} for i, out in enumerate(llm.classify(texts))]
    labels = ", ".join(llm.engine.labels)
    _write_records(args, "labels", records, texts, f"{len(texts)} texts ({llm.policy.name}); probs of {labels}")


def _texts_option(args: argparse.Namespace, least: int = 1) -> list[str] | None:
    """The texts of ``--texts``, at least ``least`` of them; None without the option (the tool's built-in text)."""
    if args.texts is None:
        return None
    texts = read_texts(args.texts)
    if len(texts) < least:
        problem = "no texts in the file" if least == 1 else f"expected at least {least} texts"
        raise InvalidInputError(f"--texts {args.texts}: {problem}")
    return texts


def cmd_check(args: argparse.Namespace) -> int:
    from hyprec.tools.check import check, plot, render

    if args.plot is not None:
        check_output_file(args.plot, "--plot", (".png",))
    texts = _texts_option(args)
    report = check(args.model, texts, device=args.device)
    print(json.dumps(report.as_dict(), indent=2) if args.json else render(report), flush=True)  # before the plot
    if args.plot is not None:
        write_output(args.plot, lambda path: plot(report, str(path)), "the chart")
        print(f"wrote {args.plot}", file=sys.stderr)
    if report.non_finite:
        print(f"hyprec: error: {report.verdicts['float16'].reason}", file=sys.stderr)
        return CHECK_FOUND_NON_FINITE
    return 0


def cmd_compare(args: argparse.Namespace) -> None:
    from hyprec.tools.compare import compare

    texts = _texts_option(args, least=2)
    report = compare(
        args.model,
        policies=args.policies,
        reference=args.reference,
        texts=texts,
        device=args.device,
        precision_plan=args.precision_plan,
        half_arithmetic=args.half_arithmetic,
    )
    print(json.dumps(report.as_dict(), indent=2) if args.json else report.markdown())


def cmd_repair(args: argparse.Namespace) -> int:
    from hyprec.tools.repair import render, repair

    check_output_file(args.output, "--output", (".json",))
    texts = _texts_option(args)
    plan = repair(
        args.model,
        target=args.target,
        tolerance=args.tolerance,
        search_margin=args.search_margin,
        texts=texts,
        max_tokens=args.max_tokens,
        device=args.device,
        show_progress=not args.quiet,
        half_arithmetic=args.half_arithmetic,
    )
    print(json.dumps(plan.as_dict(), indent=2) if args.json else render(plan), flush=True)
    write_output(args.output, plan.save, "the plan")
    print(f"wrote {args.output}", file=sys.stderr)
    if not plan.measured["meets_tolerance"]:
        print("hyprec: warning: the plan misses the tolerance on the text above (see 'measured')", file=sys.stderr)
        return 3
    return 0


def cmd_serve(args: argparse.Namespace) -> None:
    try:
        import uvicorn

        from hyprec.serving.app import build_app
        from hyprec.serving.settings import ServerSettings
    except ImportError as exc:
        raise InvalidInputError(f"hyprec serve needs the 'serve' extra: pip install 'hyprec[serve]' ({exc})") from None
    settings = ServerSettings.from_args(args)  # before loading: a bad key file fails fast
    llm = load_llm(args, args.model)
    app = build_app(llm, settings)
    where = f"http://{args.host}:{args.port}"
    print(f"hyprec: serving {settings.model_name} ({llm.policy.name}) on {where}", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning" if args.quiet else "info")


def cmd_embed_dataset(args: argparse.Namespace) -> None:
    from hyprec.ray import embed_dataset

    target = embed_dataset(
        args.input,
        args.output,
        args.model,
        ray_address=args.ray_address,
        concurrency=args.concurrency,
        column=args.column,
        batch_size=args.batch_size,
        num_cpus_per_actor=args.num_cpus_per_actor,
        show_progress=not args.quiet,
        **_llm_options(args),
    )
    print(f"wrote {target}", file=sys.stderr)


def cmd_info(args: argparse.Namespace) -> None:
    info = load_llm(args, args.model).info()
    if args.json:
        print(json.dumps(info, indent=2))
        return
    policy = info.pop("policy")
    width = max(map(len, info)) + 2
    for key, value in info.items():
        print(f"{key:<{width}}{value}")
    print("policy")
    for key, value in policy.items():
        print(f"  {key:<{width - 2}}{value}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        status = {
            "embed": cmd_embed,
            "score": cmd_score,
            "rerank": cmd_rerank,
            "classify": cmd_classify,
            "info": cmd_info,
            "generate": cmd_generate,
            "chat": cmd_chat,
            "check": cmd_check,
            "compare": cmd_compare,
            "repair": cmd_repair,
            "serve": cmd_serve,
            "embed-dataset": cmd_embed_dataset,
        }[args.command](args)
    except HyprecError as exc:
        print(f"hyprec: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: a short message, not a torch traceback
        print("\nhyprec: interrupted", file=sys.stderr)
        return INTERRUPTED
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
