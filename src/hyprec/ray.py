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

import os
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from hyprec.errors import InvalidInputError

OUTPUT_FILE = "embeddings.parquet"


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


def embed_dataset(
    input_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    model: str | os.PathLike | None = None,
    *,
    ray_address: str | None = "local",
    concurrency: int = 2,
    column: str = "text",
    batch_size: int = 256,
    num_cpus_per_actor: float = 1.0,
    show_progress: bool = True,
    **llm_options: Any,
) -> Path:
    """Embed the ``column`` of a ``.jsonl`` (one JSON object per line) or ``.parquet`` file on ``concurrency``
    Ray actors; write ``output_dir/embeddings.parquet`` with every input row in input order plus ``embedding``.

    ``ray_address``: ``local`` (or None) starts a local Ray runtime; anything else is passed to ``ray.init``.
    Each actor reserves ``num_cpus_per_actor`` CPUs: Ray waits until the cluster has room for all of them.
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
    out_dir.mkdir(parents=True, exist_ok=True)
    if not ray.is_initialized():
        ray.init(address=None if ray_address in (None, "local") else ray_address, log_to_driver=False)
    ray.data.DataContext.get_current().execution_options.preserve_order = True  # rows come back in input order

    ds = ray.data.read_json(str(source)) if source.suffix == ".jsonl" else ray.data.read_parquet(str(source))
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
        num_cpus=num_cpus_per_actor,
        batch_format="pyarrow",
    )
    target = out_dir / OUTPUT_FILE
    writer = None
    try:
        with tqdm(total=total, desc="embed-dataset", unit="row", disable=not show_progress) as bar:
            for table in embedded.iter_batches(batch_format="pyarrow", batch_size=None):
                if writer is None:
                    writer = pq.ParquetWriter(str(target), table.schema)
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
