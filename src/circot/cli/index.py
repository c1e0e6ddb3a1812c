"""``circot index build | add | remove | info``: embed a gallery of images into a searchable index.

The index is a store URI (:mod:`circot.store`): a folder (faiss, the default), a milvus-lite database
(``file.db`` or ``milvus-lite:///file.db?collection=NAME``) or a Milvus server (``milvus://host:19530/NAME``).
Every command takes it as ``--store`` (``--index``; ``--out`` for build, the older names, still work).
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

index_app = typer.Typer(help="Build, grow and prune gallery indexes.", no_args_is_help=True)

STORE_HELP = (
    "Index: a folder (faiss), a milvus-lite database (file.db, or milvus-lite:///file.db?collection=NAME) "
    "or a Milvus server (milvus://host:19530/NAME)."
)


def _summary(index, out: str, added: int | None, seconds: float) -> dict:
    m = index.manifest
    return {
        "index": str(out),
        "count": m.count,
        "added": added,
        "dim": m.dim,
        "factory": m.factory,
        "model": m.model,
        "model_fingerprint": m.model_fingerprint,
        "seconds": round(seconds, 3),
    }


def _echo(info: dict, as_json: bool, verb: str, added: str = "added") -> None:
    if as_json:
        typer.echo(json.dumps(info, indent=1))
        return
    extra = f" ({info['added']} {added})" if info.get("added") is not None else ""
    typer.echo(
        f"{verb} {info['index']}: {info['count']} images{extra}, dim {info['dim']}, factory {info['factory']}, "
        f"model {info['model'] or '?'} [{info['model_fingerprint']}] in {info['seconds']:.1f}s"
    )
    if "skipped" in info:
        typer.echo(f"skipped {info['skipped']} unreadable image(s); list in {info['skip_report']}")


@index_app.command("build")
def build_command(
    images: Path = typer.Option(
        ..., "--images", help="Folder of images (recursive) or a text file of paths."
    ),
    out: str = typer.Option(
        ..., "--store", "--out", help=STORE_HELP + " Written anew; replaced only when the build completes."
    ),
    model: str = typer.Option(
        None, "--model", help="Model folder or hub id; default: the shipped shapes model."
    ),
    factory: str = typer.Option(
        "Flat", "--factory", help="faiss factory string: Flat (exact), IVF1024,PQ32, HNSW32..."
    ),
    nprobe: int = typer.Option(
        None, "--nprobe", min=1, help="IVF lists to visit per search (saved in the index)."
    ),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Images per forward pass."),
    cache: Path = typer.Option(
        None, "--cache", help="Embedding cache folder; default $CIRCOT_CACHE or ~/.cache/circot."
    ),
    no_cache: bool = typer.Option(False, "--no-cache", help="Do not read or fill the embedding cache."),
    fp16_cache: bool = typer.Option(False, "--fp16-cache", help="Store cached embeddings as float16."),
    device: str = typer.Option("auto", "--device", help="Torch device: auto, cpu, cuda, cuda:1..."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Write into a non-empty folder that is not an index (its files are kept)."
    ),
    skip_bad: bool = typer.Option(
        False, "--skip-bad", help="Leave out unreadable images; list them in OUT/skipped.json."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary."),
) -> None:
    """Embed every image under --images with the model and write an index folder at --out.

    Resumable: re-running an interrupted build skips the images already encoded. Launched with several
    processes (torchrun / accelerate launch), each encodes a shard and rank 0 writes the index. --out must
    be a new or empty folder or an index; only the files of the index's own manifest are ever removed.
    """
    import time

    from circot.gallery import build_index, check_out_folder, list_images, skip_report_path
    from circot.index import GalleryIndex
    from circot.search import check_device, load_model, model_reference
    from circot.store import parse_store_uri

    t0 = time.perf_counter()
    list_images(images)  # fail on bad input before loading the model
    spec = parse_store_uri(out)
    if spec.is_faiss:
        check_out_folder(spec.path, overwrite)
    if device != "auto":
        check_device(device)
    net = load_model(model, device)
    if spec.is_faiss:  # a bad factory fails before encoding
        GalleryIndex.create(net.embedding_dim, "check", factory=factory)
    index = build_index(
        net,
        images,
        out,
        factory=factory,
        batch_size=batch_size,
        cache_dir=cache,
        use_cache=not no_cache,
        cache_dtype="float16" if fp16_cache else "float32",
        model_ref=model_reference(model),
        search_params={"nprobe": nprobe} if nprobe else None,
        progress=not as_json,
        overwrite=overwrite,
        skip_bad=skip_bad,
    )
    if index is not None:
        info = _summary(index, out, None, time.perf_counter() - t0)
        if skip_bad:
            _note_skipped(info, index, skip_report_path(spec))
        _echo(info, as_json, "built")


def _note_skipped(info: dict, store: object, report: Path | None) -> None:
    info["skipped"] = len(store.skipped)
    info["skip_report"] = str(report) if report is not None else "the log (not written for a server)"


@index_app.command("add")
def add_command(
    index: str = typer.Option(..., "--store", "--index", help=STORE_HELP),
    images: Path = typer.Option(
        ..., "--images", help="Folder of images or a text file of paths; known ids are skipped."
    ),
    replace: bool = typer.Option(
        False,
        "--replace",
        help="Encode the known ids too and replace their vectors and paths (edited images).",
    ),
    model: str = typer.Option(None, "--model", help="Model; default: the one recorded in the index."),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Images per forward pass."),
    cache: Path = typer.Option(None, "--cache", help="Embedding cache folder."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Do not read or fill the embedding cache."),
    fp16_cache: bool = typer.Option(False, "--fp16-cache", help="Store cached embeddings as float16."),
    device: str = typer.Option("auto", "--device", help="Torch device."),
    skip_bad: bool = typer.Option(
        False, "--skip-bad", help="Leave out unreadable images; add them to the index's skip report."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary."),
) -> None:
    """Add the new images under --images to an index, without re-encoding the images it holds (--replace: and
    replace those it holds)."""
    import time

    from circot.gallery import add_images, list_images, skip_report_path
    from circot.search import load_model
    from circot.store import parse_store_uri, read_store_manifest

    t0 = time.perf_counter()
    manifest = read_store_manifest(index)
    list_images(images)
    net = load_model(model or manifest.model, device)
    result, added = add_images(
        index,
        net,
        images,
        batch_size=batch_size,
        cache_dir=cache,
        use_cache=not no_cache,
        cache_dtype="float16" if fp16_cache else "float32",
        progress=not as_json,
        skip_bad=skip_bad,
        replace=replace,
    )
    if result is not None:
        info = _summary(result, index, added, time.perf_counter() - t0)
        if skip_bad:
            _note_skipped(info, result, skip_report_path(parse_store_uri(index)))
        _echo(info, as_json, "updated", "added or replaced" if replace else "added")


@index_app.command("remove")
def remove_command(
    index: str = typer.Option(..., "--store", "--index", help=STORE_HELP),
    ids: list[str] = typer.Option(None, "--ids", help="Id of an image to remove (repeat the option)."),
    ids_file: Path = typer.Option(None, "--ids-file", help="Text file of ids to remove, one per line."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary."),
) -> None:
    """Remove images from an index by id; ids it does not hold are counted, not an error."""
    import time

    from circot.errors import CircotError
    from circot.store import store_writer

    t0 = time.perf_counter()
    wanted = list(ids or [])
    if ids_file is not None:
        try:
            lines = ids_file.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise CircotError(
                f"--ids-file {str(ids_file)!r}: cannot read it ({exc.strerror or exc})"
            ) from None
        wanted += [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    if not wanted:
        raise CircotError(
            "index remove: give the ids to remove with --ids ID (repeatable) or --ids-file FILE"
        )
    wanted = list(dict.fromkeys(wanted))
    with store_writer(index) as store:
        removed = store.delete(wanted)
    info = _summary(store, index, None, time.perf_counter() - t0)
    info.update(removed=removed, not_found=len(wanted) - removed)
    if as_json:
        typer.echo(json.dumps(info, indent=1))
    else:
        typer.echo(
            f"removed {removed} image(s) from {index} ({info['not_found']} id(s) not in it): "
            f"{info['count']} images in {info['seconds']:.1f}s"
        )


@index_app.command("info")
def info_command(
    index: str = typer.Option(..., "--store", "--index", help=STORE_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest as JSON."),
) -> None:
    """Show an index's manifest: count, dimension, factory, model fingerprint, versions."""
    from circot.store import read_store_manifest

    m = read_store_manifest(index).to_dict()
    if as_json:
        typer.echo(json.dumps(m, indent=1))
    else:
        for key in (
            "count",
            "dim",
            "factory",
            "normalized",
            "metric",
            "model",
            "model_fingerprint",
            "search_params",
            "circot_version",
            "faiss_version",
        ):
            typer.echo(f"{key:>18}: {m[key]}")


def register(app: typer.Typer) -> None:
    app.add_typer(index_app, name="index")
