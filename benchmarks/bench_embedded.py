"""Driver memory of planning a Parquet manifest with embedded audio (Hugging Face's `Audio` layout).

    python benchmarks/bench_embedded.py ROWS WORKDIR

Writes WORKDIR/m.parquet once (ROWS rows of the sample recordings' bytes, each made unique, in row
groups of 100 as `datasets` writes audio), then plans it (`prepare_plan`) into WORKDIR/out and reads
every bucket back, printing the peak resident memory of the planning, the buckets and the largest.
"""

import resource
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from granite_batch.inputs.manifest import ManifestStream
from granite_batch.inputs.plan import plan_bucket, prepare_plan
from granite_batch.inputs.rows import Defaults
from granite_batch.storage import OutputRoot

AUDIO = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def write_manifest(path: Path, rows: int) -> None:
    samples = [p for p in sorted(Path("samples").glob("*.*")) if p.suffix in (".flac", ".mp3", ".ogg", ".m4a", ".wav")]
    data = [p.read_bytes() for p in samples]
    with pq.ParquetWriter(path, pa.schema([("audio", AUDIO)])) as writer:
        for start in range(0, rows, 100):
            writer.write_table(
                pa.table(
                    {
                        "audio": pa.array(
                            [
                                {
                                    "bytes": data[i % len(data)] + i.to_bytes(8, "little"),
                                    "path": f"r{i}{samples[i % len(data)].suffix}",
                                }
                                for i in range(start, min(rows, start + 100))
                            ],
                            AUDIO,
                        )
                    }
                )
            )


def main() -> None:
    rows, work = int(sys.argv[1]), Path(sys.argv[2])
    work.mkdir(parents=True, exist_ok=True)
    path = work / "m.parquet"
    if not path.exists():
        write_manifest(path, rows)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.time()
    layout = prepare_plan(ManifestStream(str(path), Defaults()), OutputRoot(str(work / "out")), str(work / "plan"))
    plan_s = time.time() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    largest = max(plan_bucket(layout, b)[0].nbytes for b in range(layout.buckets))
    print(
        f"manifest {path.stat().st_size / 1e6:.0f} MB ({layout.rows_in} rows): plan {plan_s:.1f} s, peak RSS "
        f"{peak >> 10} MB (before {before >> 10} MB), {layout.buckets} buckets, largest {largest / 1e6:.0f} MB, "
        f"{layout.input_block_rows(16)} rows per input block"
    )


if __name__ == "__main__":
    main()
