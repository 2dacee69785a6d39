"""Scale-out on Ray: embed datasets with a pool of actors (Ray Data), serve the HTTP app with N replicas (Ray Serve).

* :class:`EmbedBatch` is a callable class for ``ray.data.Dataset.map_batches``: each actor owns one engine and
  appends an embedding column (``FixedSizeList<float32>``) to the Arrow batches it receives::

      ds.map_batches(EmbedBatch, fn_constructor_kwargs={"model": "minilm"},
                     compute=ray.data.ActorPoolStrategy(size=4), batch_format="pyarrow")

* :func:`embed_dataset` reads a ``.jsonl`` or ``.parquet`` file, embeds its text column on ``concurrency`` actors
  and writes one Parquet file with every input row, in input order, plus the embedding column.
* :func:`serve_app` wraps the same FastAPI app as ``hyprec serve`` in a Ray Serve deployment with N replicas.

Needs the ``ray`` extra (``pip install 'hyprec[ray]'``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from hyprec.errors import InvalidInputError
from hyprec.output_files import check_output_dir, replaced_on_success

log = logging.getLogger("hyprec")

OUTPUT_FILE = "embeddings.parquet"
STALL_WARNING_S = 120.0  # no rows for this long: say what Ray is waiting for (loading a model takes seconds)


def _require_ray():
    try:
        import ray
        import ray.data
    except ImportError as exc:
        raise InvalidInputError(f"this needs the 'ray' extra: pip install 'hyprec[ray]' ({exc})") from None
    return ray


class EmbedBatch:
    """Embeds the ``column`` of Arrow batches with one engine per actor (see the module docstring).

    Args:
        model: as :class:`hyprec.LLM` takes (``None``: the embedded default).
        column: the text column.
        output_column: the embedding column appended to each batch.
        normalize, dimensions, prompt_name: as :meth:`hyprec.LLM.embed`.
        **llm_options: dtype policy and engine options for :class:`hyprec.LLM`.
    """

    def __init__(
        self,
        model: str | os.PathLike | None = None,
        *,
        column: str = "text",
        output_column: str = "embedding",
        normalize: bool | None = None,
        dimensions: int | None = None,
        prompt_name: str | None = None,
        **llm_options: Any,
    ):
        from hyprec import LLM

        self.llm = LLM(model, **llm_options)
        self.column, self.output_column = column, output_column
        self.embed_options = {"normalize": normalize, "dimensions": dimensions, "prompt_name": prompt_name}

    def __call__(self, batch: Any) -> Any:
        import pyarrow as pa

        if self.column not in batch.column_names:
            raise InvalidInputError(f"no column {self.column!r} in the dataset (columns: {batch.column_names})")
        texts = batch.column(self.column).to_pylist()
        bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
        if bad is not None:
            raise InvalidInputError(f"column {self.column!r}: row {bad} of a batch is {texts[bad]!r:.40}, not text")
        vectors = self.llm.embed(texts, **self.embed_options)
        flat = pa.array(vectors.reshape(-1), type=pa.float32())
        return batch.append_column(self.output_column, pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1]))


def plan_cpus(cluster_cpus: float, concurrency: int, num_cpus_per_actor: float | None) -> tuple[float, float]:
    """``(CPUs per actor, CPUs per read task)`` that fit a runtime of ``cluster_cpus`` together.

    Ray Data starts the actor pool and then schedules read tasks beside it: if the actors reserve every CPU, the
    read waits for one forever and no row ever reaches an actor (2 actors x 1 CPU on a 2-CPU machine). By default
    each actor gets an equal share of what one read task leaves, and a read task gets the share of one more actor,
    both at most 1 CPU. An explicit ``num_cpus_per_actor`` that leaves no room for reading is refused.

    Raises:
        InvalidInputError: the actors would leave no CPU for reading the input.
    """
    if num_cpus_per_actor is None:
        read = _round_down(min(1.0, cluster_cpus / (concurrency + 1)))
        return _round_down(min(1.0, (cluster_cpus - read) / concurrency)), read
    _check_cpus(num_cpus_per_actor)
    left = _round_down(cluster_cpus - concurrency * num_cpus_per_actor)
    if left <= 0:
        raise InvalidInputError(
            f"concurrency {concurrency} x num_cpus_per_actor {num_cpus_per_actor:g} reserves "
            f"{concurrency * num_cpus_per_actor:g} CPUs for the actors, which leaves none of the Ray runtime's "
            f"{cluster_cpus:g} CPUs for reading the input: Ray would wait forever. Lower either, or leave "
            "num_cpus_per_actor unset to size the actors to the runtime"
        )
    return float(num_cpus_per_actor), min(1.0, left)


@contextlib.contextmanager
def _logger_level(name: str, level: int | None) -> Iterator[None]:
    """Set the level of logger ``name`` for the block (None leaves it), then restore it."""
    logger = logging.getLogger(name)
    before = logger.level
    if level is not None:
        logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(before)


def _check_cpus(num_cpus_per_actor: object) -> None:
    number = isinstance(num_cpus_per_actor, (int, float)) and not isinstance(num_cpus_per_actor, bool)
    if not number or not num_cpus_per_actor > 0:  # "not >" also refuses NaN
        raise InvalidInputError(f"num_cpus_per_actor={num_cpus_per_actor!r}: expected a positive number")


def _round_down(cpus: float) -> float:
    """Ray keeps resources in units of 1e-4 and rounds requests: three requests of 2/3 CPU would round up to more
    than 2. Hundredths, rounded down, always fit."""
    return math.floor(cpus * 100) / 100


class StallWarning:
    """Warns on the ``hyprec`` logger whenever no rows arrived for ``seconds``: Ray waits silently (forever) for
    resources it cannot get, and a stalled progress bar does not say why."""

    def __init__(self, seconds: float, describe: Callable[[], str]):
        self.seconds, self.describe = seconds, describe
        self._rows, self._done = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._watch, name="hyprec-stall-warning", daemon=True)

    def __enter__(self) -> StallWarning:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._rows.set()  # wake the watcher so that it sees _done
        self._thread.join()

    def progress(self) -> None:
        """Rows arrived: restart the clock."""
        self._rows.set()

    def _watch(self) -> None:
        while not self._done.is_set():
            if self._rows.wait(self.seconds):
                self._rows.clear()
            elif not self._done.is_set():
                log.warning("hyprec: embed-dataset: no rows for %.0f s. %s", self.seconds, self.describe())


def embed_dataset(
    input_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    model: str | os.PathLike | None = None,
    *,
    ray_address: str | None = "local",
    concurrency: int = 2,
    column: str = "text",
    batch_size: int = 256,
    num_cpus_per_actor: float | None = None,
    show_progress: bool = True,
    **llm_options: Any,
) -> Path:
    """Embed the ``column`` of a ``.jsonl`` (one JSON object per line) or ``.parquet`` file on ``concurrency``
    Ray actors; write ``output_dir/embeddings.parquet`` with every input row in input order plus ``embedding``.

    ``ray_address``: ``local`` (or None) starts a local Ray runtime; anything else is passed to ``ray.init``.
    ``num_cpus_per_actor``: CPUs Ray reserves for each actor; by default they are sized to the runtime so that
    reading the input keeps room (:func:`plan_cpus`). A request that leaves no CPU for reading is refused on a
    local runtime, and warned about on a cluster (which may add nodes). The input and output paths are checked
    before Ray starts; the file is written under a temporary name and renamed once complete.
    """
    ray = _require_ray()
    import pyarrow.parquet as pq

    source, out_dir = Path(input_path), Path(output_dir)
    if source.suffix not in (".jsonl", ".parquet"):
        raise InvalidInputError(f"--input {source}: expected a .jsonl or .parquet file")
    if not source.is_file():
        raise InvalidInputError(f"--input {source}: file not found")
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
        raise InvalidInputError(f"concurrency={concurrency!r}: expected a positive integer")
    if num_cpus_per_actor is not None:
        _check_cpus(num_cpus_per_actor)
    target = check_output_dir(out_dir, "--output") / OUTPUT_FILE
    if target.is_dir():
        raise InvalidInputError(f"--output {out_dir}: {target} is an existing directory")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InvalidInputError(f"--output {out_dir}: cannot create the directory ({exc})") from None
    local = ray_address in (None, "local")
    if not ray.is_initialized():
        ray.init(
            address=None if local else ray_address,
            log_to_driver=False,
            logging_level=logging.INFO if show_progress else logging.WARNING,
        )
    with _logger_level("ray.data", None if show_progress else logging.ERROR):  # quiet: no execution plans
        cluster_cpus = float(ray.cluster_resources().get("CPU", 0))
        try:
            actor_cpus, read_cpus = plan_cpus(cluster_cpus, concurrency, num_cpus_per_actor)
        except InvalidInputError as exc:
            if local:
                raise
            log.warning("hyprec: embed-dataset: %s (waiting for the cluster to grow)", exc)
            actor_cpus, read_cpus = float(num_cpus_per_actor), 1.0
        if concurrency > cluster_cpus:
            log.warning(
                "hyprec: embed-dataset: %d actors share %g CPUs (%g each): each loads its own model; fewer actors "
                "are as fast and use less memory",
                concurrency,
                cluster_cpus,
                actor_cpus,
            )
        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True  # rows come back in input order
        context.enable_progress_bars = show_progress  # per operator, and in logs when stderr is no terminal

        read = ray.data.read_json if source.suffix == ".jsonl" else ray.data.read_parquet
        ds = read(str(source), num_cpus=read_cpus)
        columns = ds.schema().names
        if column not in columns:
            raise InvalidInputError(f"{source}: no column {column!r} (columns: {', '.join(columns)})")
        total = ds.count()
        if total == 0:
            raise InvalidInputError(f"{source}: no rows to embed")
        embedded = ds.map_batches(
            EmbedBatch,
            fn_constructor_kwargs={"model": model, "column": column, **llm_options},
            compute=ray.data.ActorPoolStrategy(size=concurrency),
            batch_size=batch_size,
            num_cpus=actor_cpus,
            batch_format="pyarrow",
        )

        def describe() -> str:
            free = ray.available_resources().get("CPU", 0)
            return (
                f"Ray has {free:g} of {cluster_cpus:g} CPUs free; {concurrency} actors reserve {actor_cpus:g} CPU "
                f"each and reading the input {read_cpus:g}. If the cluster cannot place them, Ray waits: lower "
                "--concurrency or --num-cpus-per-actor"
            )

        writer = None
        with replaced_on_success(target) as partial, StallWarning(STALL_WARNING_S, describe) as stall:
            try:
                with tqdm(total=total, desc="embed-dataset", unit="row", disable=not show_progress) as bar:
                    for table in embedded.iter_batches(batch_format="pyarrow", batch_size=None):
                        stall.progress()
                        if writer is None:
                            writer = pq.ParquetWriter(str(partial), table.schema)
                        writer.write_table(table)
                        bar.update(table.num_rows)
            finally:
                if writer is not None:
                    writer.close()
    return target


def serve_app(
    model: str | os.PathLike | None = None,
    *,
    num_replicas: int = 1,
    model_name: str | None = None,
    num_cpus_per_replica: float = 1.0,
    server_options: dict[str, Any] | None = None,
    **llm_options: Any,
):
    """A Ray Serve application running the ``hyprec serve`` app on ``num_replicas`` replicas (one engine each).

    Run it with ``ray.serve.run(serve_app("minilm", num_replicas=2), route_prefix="/")``.
    """
    _require_ray()
    from ray import serve

    from hyprec.serving.app import build_app
    from hyprec.serving.settings import ServerSettings

    settings = ServerSettings(model_name=model_name or str(model or "minilm"), **(server_options or {}))

    class HyprecReplica:
        def __init__(self) -> None:
            from hyprec import LLM

            self.llm = LLM(model, **llm_options)

        def __serve_build_asgi_app__(self):
            return build_app(self.llm, settings)

    HyprecReplica.__name__ = HyprecReplica.__qualname__ = "HyprecReplica"
    deployment = serve.deployment(
        serve.ingress()(HyprecReplica),
        name="hyprec",
        num_replicas=num_replicas,
        ray_actor_options={"num_cpus": num_cpus_per_replica},
    )
    return deployment.bind()
