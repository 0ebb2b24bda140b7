"""The edge-compress command line (thin: parses, calls, prints)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from compress import distributed
from compress.errors import StageFailed, UserError
from compress.logs import quiet_library_logs

_err = Console(stderr=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="edge-compress")
def cli() -> None:
    """Compress a trained transformer into a validated int8 ONNX artifact, driven by a YAML recipe.

    A recipe names the model, the task, calibration/evaluation data and the stages
    (export -> quantize -> validate). Runs are written to runs/<name>/ and resume where they stopped.
    """


@cli.command()
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option("--fresh", is_flag=True, help="Discard this run's earlier stages and recompute everything.")
def run(recipe: Path, fresh: bool) -> None:
    """Run every stage of RECIPE; print the summary and where the report is.

    Finished stages whose inputs did not change are reused, so a rerun after a failure or a kill
    continues from the last finished stage.
    """
    from compress.recipe import load_recipe

    parsed = load_recipe(recipe)  # a bad recipe is refused before torch and the stages load
    if parsed.sweep is not None:
        _sweep(parsed, fresh)
        return
    from compress.pipeline import run as run_pipeline

    run_dir = run_pipeline(parsed, fresh=fresh)
    _print_summary(run_dir)


@cli.command()
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option("--fresh", is_flag=True, help="Discard every level's earlier stages and recompute everything.")
def sweep(recipe: Path, fresh: bool) -> None:
    """Run RECIPE once per level of its `sweep:` block, then score and time every level beside the teacher.

    Each level is a run of its own (output.dir/<name>-<level>), resumed like any run; the front goes to
    output.dir/<name>/ (sweep.md, report.html). With sweep.goal the fastest level within it is chosen;
    when none is, the most accurate is named and the command fails (exit 1).
    """
    from compress.recipe import load_recipe

    parsed = load_recipe(recipe)
    if parsed.sweep is None:
        raise UserError(f"{recipe}: the recipe has no sweep: block (levels to run); `run` runs it once")
    _sweep(parsed, fresh)


def _sweep(parsed: Any, fresh: bool) -> None:
    from compress.sweep.run import sweep as run_sweep

    out = run_sweep(parsed, fresh=fresh)
    if not distributed.is_main():
        return  # torchrun: rank 0 measures, writes and prints the front
    click.echo((out / "sweep.md").read_text())
    click.echo(f"front: {out / 'sweep.md'}, {out / 'report.html'}")


@cli.command()
@click.argument("recipe", type=click.Path(path_type=Path))
def check(recipe: Path) -> None:
    """Validate RECIPE without running it: what `run` would refuse before any work is refused here too.

    Fields, values and stage order; the model folder (config, tokenizer, weights that load into it);
    the user's data files; the lengths the stages ask of the model; the run folder it would write.
    """
    from compress.recipe import load_recipe

    parsed = load_recipe(recipe)  # a bad recipe is refused before torch and the stages load
    from compress.pipeline.preflight import preflight
    from compress.pipeline.run_dir import check_claim

    source = preflight(parsed, deep=True)
    check_claim(parsed.output.dir / parsed.name)
    folder = source.files.get("model", "new, trained by the recipe")
    stages = " -> ".join(s.type for s in parsed.stages)
    levels = ""
    if parsed.sweep is not None:
        from compress.sweep.levels import level_recipes, teacher_recipe

        made = level_recipes(parsed)  # every level's recipe, as the sweep will run it, and the teacher's export
        for level in (teacher_recipe(parsed), *(level for _, level in made)):
            check_claim(level.output.dir / level.name)
        levels = f"; sweep of {len(made)} levels: {', '.join(level.name for _, level in made)}"
    click.echo(_printable(f"{recipe}: ok ({parsed.name}: {stages}; model {folder}{levels})"))


@cli.command()
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option("--fresh", is_flag=True, help="Discard earlier checkpoints and train from the start.")
def train(recipe: Path, fresh: bool) -> None:
    """Run RECIPE up to and including its train stage.

    Checkpoints are written every epoch: after a kill, the same command resumes from the last one.
    """
    from compress.recipe import load_recipe

    parsed = load_recipe(recipe)  # a bad recipe is refused before torch and the stages load
    from compress.pipeline import run as run_pipeline

    if "train" not in [s.type for s in parsed.stages]:
        raise UserError(f"{recipe}: the recipe has no train stage")
    run_dir = run_pipeline(parsed, fresh=fresh, until="train")
    _print_summary(run_dir)


@cli.command()
def schema() -> None:
    """Print the recipe's JSON Schema (point your editor's YAML plugin at it for completion)."""
    from compress.recipe import recipe_schema

    click.echo(json.dumps(recipe_schema(), indent=2))


@cli.command("build-ops")
@click.option(
    "--arch",
    type=click.Choice(["x86_64", "aarch64", "all"]),
    default=None,
    help="Architecture to build for (default: this machine's); aarch64 needs g++-aarch64-linux-gnu.",
)
@click.option("--force", is_flag=True, help="Rebuild even when the sources did not change.")
def build_ops(arch: str | None, force: bool) -> None:
    """Compile the native ONNX Runtime kernels of the custom attention ops (exporters/native/).

    ONNX Runtime's headers are fetched once into the cache (Debian's libonnxruntime-dev); an unchanged
    build is reused.
    """
    from exporters.native import ARCHES, host_arch
    from exporters.native.build import build

    for target in ARCHES if arch == "all" else [arch or host_arch()]:
        click.echo(f"{target}: {build(target, force=force)}")


@cli.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
def report(run_dir: Path) -> None:
    """Re-render report.md and report.html of a run from its report.json (of a sweep: sweep.md and report.html
    from sweep.json), and print the summary."""
    from compress.report import render

    if (run_dir / "sweep.json").is_file():
        from compress.report.sweep import write_front

        write_front(run_dir, json.loads((run_dir / "sweep.json").read_text()))
        click.echo((run_dir / "sweep.md").read_text())
        return
    if distributed.is_main():
        render(run_dir)
    _print_summary(run_dir)


@cli.group()
def targets() -> None:
    """Validation targets: x86_64 (this CPU), x86_64-avx2, aarch64, aarch64-neon (emulated), docker:IMAGE."""


@targets.command("list")
def targets_list() -> None:
    """Each named target, and whether it is ready or what its setup still needs."""
    from compress import targets as registry

    for name, target in registry.NAMED.items():
        problem = target.problem()
        click.echo(f"{name:14} {target.describe():60} {'ready' if problem is None else 'not ready: ' + problem}")


@targets.command("setup")
@click.argument("names", nargs=-1)
def targets_setup(names: tuple[str, ...]) -> None:
    """Build and cache the environments of NAMES (default: every emulated target), then check their health.

    Installs qemu-user-static and mmdebstrap from Debian's packages when missing (as root), unpacks an arm64
    Debian userland with Python, and installs aarch64 wheels of onnxruntime and numpy. About 1-2 minutes
    from nothing; an existing setup is reused.
    """
    import time

    from compress import targets as registry

    chosen = [registry.get(n) for n in names] or [t for t in registry.NAMED.values() if t.kind == "emulated"]
    for target in chosen:
        start = time.perf_counter()
        click.echo(f"{target.name}: setting up {target.describe()}")
        target.setup(click.echo)
        problem = target.problem()
        if problem:
            raise UserError(f"targets: {target.name}: setup finished but {problem}")
        probe = _probe(target)
        click.echo(
            f"{target.name}: ready ({time.perf_counter() - start:.0f} s): {probe['machine']}, onnxruntime "
            f"{probe['onnxruntime']}, CPU features {' '.join(probe['cpu_features']) or '-'}"
        )


@cli.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Bundle folder (default RUN_DIR/package).")
@click.option("--image", default=None, help="Also build a Docker image NAME[:TAG] with the bundle baked in.")
@click.option(
    "--arch",
    type=click.Choice(["amd64", "arm64", "all"]),
    default=None,
    help="Image architecture (default: this machine's); all: NAME:TAG-amd64 and NAME:TAG-arm64.",
)
@click.option(
    "--push",
    is_flag=True,
    help="Push the image(s) to the registry the name starts with (HOST[:PORT]/NAME[:TAG]); with --arch all also "
    "one multi-arch tag NAME[:TAG], a manifest list over the amd64 and arm64 tags.",
)
@click.option("--allow-unvalidated", is_flag=True, help="Package a run whose validation gate failed or is missing.")
@click.option(
    "--variant",
    "variants",
    multiple=True,
    type=click.Path(path_type=Path),
    help=(
        "Another run of the same model, quantized and validated for another CPU family: the bundle holds one int8 "
        "model per family (model_qint8_avx512_vnni.onnx, model_qint8_avx2.onnx, model_qint8_arm64.onnx) and the "
        "server picks the one of its CPU. Repeat for each family."
    ),
)
def package(  # noqa: PLR0917 (click passes every option as an argument)
    run_dir: Path,
    out: Path | None,
    image: str | None,
    arch: str | None,
    push: bool,
    allow_unvalidated: bool,
    variants: tuple[Path, ...],
) -> None:
    """Write RUN_DIR's deployable bundle (model.onnx, tokenizer/, metadata.json) and, with --image, its image.

    The bundle is what the runtime image serves: mount it read-only at /model
    (`docker run -v BUNDLE:/model:ro edge-compress/runtime:amd64`), or bake it in with --image. The Docker
    engine is the one DOCKER_HOST names (or the private one `edge-compress docker start` runs).
    """
    from compress.container import images
    from compress.serving.bundle import write_bundle

    if arch is not None and image is None:
        raise UserError("--arch needs --image (the bundle itself is the same for every architecture)")
    if push and image is None:
        raise UserError("--push needs --image (NAME: HOST[:PORT]/NAME[:TAG])")
    if push and images.registry_of(str(image)) is None:
        raise UserError(f"--push: {image} names no registry; write it as HOST[:PORT]/NAME[:TAG]")
    run_dir = _chosen_level(run_dir)
    bundle = out or run_dir / "package"
    if variants:
        from compress.serving.variants import write_variant_bundle

        if allow_unvalidated:
            raise UserError("--variant packages validated runs only: every variant's family must have passed its gate")
        meta = write_variant_bundle([run_dir, *variants], bundle)
        families = ", ".join(f"{f} ({v['file']})" for f, v in meta["variants"].items())
        click.echo(f"bundle: {bundle} ({meta['task']}, int8 variants: {families})")
    else:
        meta = write_bundle(run_dir, bundle, allow_unvalidated=allow_unvalidated)
        click.echo(f"bundle: {bundle} ({meta['task']}, {meta['precision']}, sha256 {meta['model_sha256'][:12]})")
        if not meta["validated"]["passed"]:
            _err.print(f"[bold yellow]warning:[/] not validated: {meta['validated']['why']}", highlight=False)
    if image is None:
        return
    env = images.engine_env()
    arches = ["amd64", "arm64"] if arch == "all" else [arch or images.host_arch()]
    tags = []
    for one in arches:
        tag = images.arch_tag(image, one) if len(arches) > 1 else image
        images.build_model_image(bundle, tag, one, env, click.echo)
        size = images.docker(["image", "inspect", "-f", "{{.Size}}", tag], env, "inspecting the image").strip()
        click.echo(f"image: {tag} (linux/{one}, {int(size) / 1e6:.0f} MB)")
        tags.append(tag)
    if push and len(tags) > 1:
        digest = images.push_multiarch(image, tags, env, click.echo)
        click.echo(f"pushed: {image} (a manifest list over {', '.join(arches)}; {digest})")
    elif push:
        images.docker(["push", image], env, f"pushing {image}")
        click.echo(f"pushed: {image}")


@cli.command(context_settings={"ignore_unknown_options": True})
@click.argument("bundle", type=click.Path(path_type=Path))
@click.argument("server_options", nargs=-1, type=click.UNPROCESSED)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8080, show_default=True)
@click.option("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: every core).")
@click.option(
    "--cpu-family",
    type=click.Choice(["aarch64", "x86_64-avx2", "x86_64-vnni"]),
    default=None,
    help="A bundle of variants: serve this CPU family's int8 model (default: this CPU's, from its flags).",
)
def serve(
    bundle: Path, server_options: tuple[str, ...], *, host: str, port: int, threads: int | None, cpu_family: str | None
) -> None:
    """Serve BUNDLE (from `edge-compress package`) on this machine: the runtime images' server, natively.

    Other options go to the server as they are: limits, batching, --api-key-file, --rerank-label,
    --no-access-log (`python compress/serving/server.py --help` lists them)."""
    from compress.serving import server
    from exporters.native import available, library_path

    args = ["--model", str(bundle), "--host", host, "--port", str(port)]
    args += ["--threads", str(threads)] if threads else []
    args += ["--cpu-family", cpu_family] if cpu_family else []
    args += ["--ops-library", str(library_path())] if available() else []
    code = server.main([*args, *server_options])  # a bundle it cannot serve: one "error: ..." line on stderr, exit 2
    if code:
        sys.exit(code)


@cli.group("docker")
def docker_group() -> None:
    """A private Docker engine and the runtime images (see docker/README.md)."""


@docker_group.command("start")
def docker_start() -> None:
    """Start a private Docker engine (own socket and data root under build/docker/engine) and print its DOCKER_HOST."""
    from compress.container.engine import Engine
    from compress.container.images import build_root

    engine = Engine(build_root() / "engine")
    engine.start(click.echo)
    click.echo(f"export DOCKER_HOST={engine.host}")


@docker_group.command("stop")
def docker_stop() -> None:
    """Stop the private engine (only our own dockerd, by its PID) after removing the networks made on it.

    Host networking is never reverted: what changed since the engine started is reported and left as is.
    """
    from compress.container.engine import Engine
    from compress.container.images import build_root

    messages = Engine(build_root() / "engine").stop()
    click.echo("stopped; " + ("; ".join(messages) if messages else "nothing to remove, host networking as at start"))


@docker_group.command("build")
@click.option("--arch", type=click.Choice(["amd64", "arm64", "all"]), default="all", show_default=True)
@click.option("--pipeline", is_flag=True, help="Also the amd64 pipeline image (edge-compress with PyTorch CPU).")
def docker_build(arch: str, pipeline: bool) -> None:
    """Build the base and runtime images (python3.11, onnxruntime, numpy, tokenizers, our kernels, the server)."""
    from compress.container import images

    env = images.engine_env()
    built = [
        (images.build_runtime(one, env, click.echo), one) for one in (["amd64", "arm64"] if arch == "all" else [arch])
    ]
    if pipeline:
        built.append((images.build_pipeline(env, click.echo), "amd64"))
    for tag, one in built:
        size = images.docker(["image", "inspect", "-f", "{{.Size}}", tag], env, "inspecting the image").strip()
        click.echo(f"image: {tag} (linux/{one}, {int(size) / 1e6:.0f} MB)")


def _chosen_level(run_dir: Path) -> Path:
    """A sweep's output folder stands for the level its goal chose; any other folder for itself."""
    sweep = run_dir / "sweep.json"
    if not sweep.is_file():
        return run_dir
    try:
        result = json.loads(sweep.read_text())
        chosen = next(r["run"] for r in result["rows"] if r["label"] == result["chosen"])
    except (OSError, ValueError, KeyError, TypeError, StopIteration):
        raise UserError(
            f"{run_dir} is a sweep whose goal chose no level: package a level's run folder "
            f"({run_dir.parent / run_dir.name}-<level>)"
        ) from None
    click.echo(f"{run_dir}: the sweep chose {result['chosen']}: packaging {chosen}")
    return Path(chosen)


def _probe(target: object) -> dict[str, Any]:
    """The health check: the worker starts on the target and imports onnxruntime."""
    import tempfile

    from compress.targets import Target

    assert isinstance(target, Target)
    with tempfile.TemporaryDirectory(prefix="edge-compress-probe-") as tmp:
        result = target.run(Path(tmp), {"mode": "probe", "threads": 1})
    result["cpu_features"] = target.cpu_features(result["cpu_features"])
    return result


def _print_summary(run_dir: Path) -> None:
    from compress.report import stage_note, stage_time, summary_rows

    if not distributed.is_main():
        return  # torchrun: rank 0 writes and prints the report, maybe after this rank has finished
    path = run_dir / "report.json"
    if not path.is_file():
        raise UserError(f"{run_dir}: no report.json (is this a finished run directory?)")
    data = json.loads(path.read_text())
    table = Table(title=f"edge-compress: {data['name']}")
    for header in ("metric", "fp32 reference", "artifact", "comparison"):
        table.add_column(header)
    for row in summary_rows(data):
        table.add_row(*row)
    console = Console(width=None if sys.stdout.isatty() else 140)
    if data["targets"]:
        console.print(table)
    stages = Table(title="stages")
    for header in ("#", "stage", "time s", "result"):
        stages.add_column(header)
    for stage in data["stages"]:
        stages.add_row(f"{stage['index']:02d}", stage["type"], stage_time(stage), stage_note(stage))
    console.print(stages)
    for warning in data["warnings"]:
        console.print(f"[bold yellow]warning:[/] {warning}")
    console.print(f"report: {run_dir / 'report.md'} (and report.json)")


def _printable(text: str) -> str:
    """`text` safe for a terminal: lone surrogates and control characters (escape sequences) shown escaped."""
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in text)


def _one_line(exc: BaseException, limit: int = 400) -> str:
    """An error message as one printable line: no markup, no newlines, bounded length."""
    from rich.markup import escape

    text = _printable(" ".join(str(exc).split()))
    return escape(text if len(text) <= limit else text[: limit - 4] + " ...")


def main() -> None:
    """Entry point: bad input is one line on stderr and exit code 2, a failed check exit code 1."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models come from local folders, never from a hub
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        distributed.init()  # under torchrun: join the process group (gloo); alone: nothing
        with quiet_library_logs():
            cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        _err.print("aborted")
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(2)
    except UserError as exc:
        _err.print(f"[bold red]error:[/] {_one_line(exc)}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except StageFailed as exc:
        _err.print(f"[bold red]failed:[/] {_one_line(exc)}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except OSError as exc:  # a path the user gave that the system refuses (too long, a loop, no permission)
        where = f": {exc.filename}" if exc.filename else ""
        message = _one_line(OSError(f"{exc.strerror or exc}{where}"))
        _err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        _err.print("interrupted: finished stages are kept; rerun to continue")
        sys.exit(130)
    except Exception as exc:
        if os.environ.get("EDGE_COMPRESS_DEBUG"):
            raise
        _err.print(
            f"[bold red]internal error:[/] {type(exc).__name__}: {_one_line(exc)} "
            "(a bug: rerun with EDGE_COMPRESS_DEBUG=1 for the traceback and report it)",
            highlight=False,
            soft_wrap=True,
        )
        sys.exit(1)


if __name__ == "__main__":
    main()
