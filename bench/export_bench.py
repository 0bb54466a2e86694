"""Results export of 100,000 (or --results) component results of 1 KB: time and peak memory.

    python bench/export_bench.py [--results 1000000]

Each export runs in a fresh process that streams the answer of the real route (through
the WSGI app, as waitress would send it) into a counting sink, and reports its time (wall
and CPU: the machine is shared) and peak RSS, for jatos-lite also the peak RSS reached
when the first chunk came (the selection of the results and the first MiB of the answer). The
baseline, measured in the same run over the same database, is the least a streaming
exporter must do: read the rows with sqlite3 and write them into a ZIP (zipfile) or as
text. Targets (DESIGN.md §7, issue #15): peak RSS under 100 MB at 100,000 and 1,000,000
results, the archive's time within 2x the baseline's.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import jatos_lite  # noqa: E402

TOKEN = "bench-token-0123456789"

# Runs in a child process: argv = root, kind, number of results. Prints JSON figures.
MEASURE = textwrap.dedent('''
    import io, json, resource, sqlite3, sys, time, zipfile
    from pathlib import Path
    root, kind, count = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])

    def peak_mb():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    class Sink(io.RawIOBase):
        size = 0
        def writable(self): return True
        def write(self, chunk):
            self.size += len(chunk)
            return len(chunk)

    def cpu_seconds():
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    first_chunk_mb = None
    if kind.startswith("jatos-lite"):
        import jatos_lite
        config = jatos_lite.Config(studies=root / "studies", data=root / "data", api_token=sys.argv[4])
        app = jatos_lite.create_app(config)
        path = {"jatos-lite archive": "/jatos/api/v1/results?studyId=1",
                "jatos-lite text": "/jatos/api/v1/results/data?studyId=1&asPlainText=true"}[kind]
        environ = {"REQUEST_METHOD": "GET", "PATH_INFO": path.split("?")[0], "QUERY_STRING": path.split("?")[1],
                   "SERVER_NAME": "localhost", "SERVER_PORT": "80", "wsgi.url_scheme": "http",
                   "wsgi.input": io.BytesIO(), "HTTP_AUTHORIZATION": "Bearer " + sys.argv[4]}
        began, cpu_began = time.perf_counter(), cpu_seconds()
        sink = Sink()
        for chunk in app(environ, lambda status, headers, exc_info=None: None):
            first_chunk_mb = first_chunk_mb or peak_mb()
            sink.write(chunk)
    else:
        db = sqlite3.connect(root / "data" / "jatos.sqlite")
        began, cpu_began = time.perf_counter(), cpu_seconds()
        rows = db.execute("SELECT study_result_id, id, data FROM component_results ORDER BY id")
        sink = Sink()
        if kind == "baseline archive":
            with zipfile.ZipFile(sink, "w", zipfile.ZIP_DEFLATED) as archive:
                for sr_id, cr_id, data in rows:
                    archive.writestr(f"study_result_{sr_id}/comp-result_{cr_id}/data.txt", data)
        else:
            for _, _, data in rows:
                sink.write(data.encode() + b"\\n")
    print(json.dumps({"seconds": time.perf_counter() - began, "cpu": cpu_seconds() - cpu_began, "peak_mb": peak_mb(),
                      "first_chunk_mb": first_chunk_mb, "bytes": sink.size}))
''')


def fill(root: Path, count: int) -> None:
    """One study with `count` finished study runs, each with one 1 KB component result."""
    config = jatos_lite.Config(studies=root / "studies", data=root / "data", api_token=TOKEN)
    store = jatos_lite.Store(config.db_path)
    now = jatos_lite.now_ms()
    with store.tx() as db:
        study_id = jatos_lite.insert_study(db, jatos_lite.study_fields({"title": "Bench"}), str(uuid.uuid4()), "bench")
        component_id = jatos_lite.insert_component(db, study_id, jatos_lite.component_fields(
            {"title": "C", "htmlFilePath": "c.html"}))
        batch_id = jatos_lite.insert_batch(db, study_id, jatos_lite.batch_fields(jatos_lite.DEFAULT_BATCH))
        data = json.dumps({"trial": "x" * 990})[:1024]
        for number in range(count):
            sr_id = db.insert("INSERT INTO study_results(uuid, study_id, batch_id, worker_id, state, start_date, "
                              "end_date) VALUES (?, ?, ?, 1, 'FINISHED', ?, ?)", str(uuid.uuid4()), study_id,
                              batch_id, now, now + 1000)
            db.run("INSERT INTO component_results(study_result_id, component_id, state, start_date, end_date, data, "
                   "data_size) VALUES (?, ?, 'FINISHED', ?, ?, ?, ?)", sr_id, component_id, now, now + 1000, data,
                   len(data))


def measure(root: Path, kind: str, count: int) -> dict:
    output = subprocess.run([sys.executable, "-c", MEASURE, str(root), kind, str(count), TOKEN], cwd=ROOT,
                            capture_output=True, text=True, check=True, env={"PYTHONPATH": str(ROOT)})
    return json.loads(output.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", type=int, default=100_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        began = time.perf_counter()
        fill(root, args.results)
        print(f"{args.results} component results of 1 KB written in {time.perf_counter() - began:.1f} s")
        print(f"{'export':>8} | {'seconds':>7} {'CPU s':>6} {'peak RSS MB':>11} {'at 1st chunk':>12} {'MB out':>6} | "
              f"{'baseline s':>10} {'CPU s':>6} {'peak RSS MB':>11} | time ratio (CPU)")
        for what in ("archive", "text"):
            lite = measure(root, f"jatos-lite {what}", args.results)
            base = measure(root, f"baseline {what}", args.results)
            print(f"{what:>8} | {lite['seconds']:>7.1f} {lite['cpu']:>6.1f} {lite['peak_mb']:>11.0f} "
                  f"{lite['first_chunk_mb']:>12.0f} {lite['bytes'] / 1e6:>6.0f} | {base['seconds']:>10.1f} "
                  f"{base['cpu']:>6.1f} {base['peak_mb']:>11.0f} | {lite['seconds'] / base['seconds']:.2f} "
                  f"({lite['cpu'] / base['cpu']:.2f})", flush=True)


if __name__ == "__main__":
    main()
