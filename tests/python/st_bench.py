"""`vectordb pipeline` with the local model against sentence-transformers on the same texts, same machine, one run.

    st_bench.py VECTORDB MODEL_DIR N

Writes N mood events (the example file's events, each with a user of its own so every text is different and no cache
can serve one), runs `VECTORDB pipeline` on them into a fresh embedded store (EMBEDDING_PROVIDER=local; its events/s
and peak RSS), then encodes the same N texts — each event's `text_representation`, built by scripts/golden.py's copy
of the Python original — with sentence-transformers (torch on the CPU, as many threads as the pipeline's
EMBEDDING_THREADS, batch 64, the same model files: Transformer + mean pooling + normalisation). Prints a Markdown table.
"""
import importlib.util
import json
import os
import pathlib
import resource
import subprocess
import sys
import tempfile
import time

vectordb, model_dir, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
root = pathlib.Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("golden", root / "scripts/golden.py")
golden = importlib.util.module_from_spec(spec)
spec.loader.exec_module(golden)

examples = [json.loads(line) for line in (root / "examples/mood_events.jsonl").read_text().splitlines() if line]
moods = [e for e in examples if e["event_type"] == "user.mood.created"]
events = []
for i in range(n):
    event = dict(moods[i % len(moods)])
    event["event_id"] = f"00000000-0000-4000-8000-{i:012d}"
    event["user_id"] = f"{event['user_id']}-{i}"
    events.append(event)
texts = [golden.text_representation(e) for e in events]
threads = int(os.environ.get("EMBEDDING_THREADS", os.cpu_count() or 1))

with tempfile.TemporaryDirectory() as work:
    path = pathlib.Path(work) / "events.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in events))
    env = dict(os.environ, EMBEDDING_PROVIDER="local", QDRANT_PATH=str(pathlib.Path(work) / "qdrant"),
               EMBEDDING_THREADS=str(threads))
    out = subprocess.run([vectordb, "pipeline", "--events", str(path), "--json"], env=env, check=True,
                         capture_output=True, text=True).stdout
    summary = json.loads(out)
    assert summary["points_written"] == n, summary
    ours = summary["events_per_s"]
    ours_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024

import torch  # noqa: E402  (after the pipeline: its import must not weigh on the Rust run)
from sentence_transformers import SentenceTransformer, models  # noqa: E402

torch.set_num_threads(threads)
transformer = models.Transformer(model_dir, max_seq_length=256)
pooling = models.Pooling(transformer.get_embedding_dimension(), pooling_mode="mean")
st = SentenceTransformer(modules=[transformer, pooling, models.Normalize()], device="cpu")
st.encode(texts[:64], batch_size=64)  # warm-up
started = time.perf_counter()
st.encode(texts, batch_size=64)
theirs = n / (time.perf_counter() - started)
theirs_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

print(f"| what | {n} texts | events/s or texts/s | peak RSS |")
print("|---|---|---:|---:|")
print(f"| `vectordb pipeline`, local model ({os.environ.get('EMBEDDING_PRECISION', 'auto')}), "
      f"{threads} threads, into the embedded store | events | {ours:.0f} | {ours_rss:.0f} MB |")
print(f"| sentence-transformers {__import__('sentence_transformers').__version__}, torch {torch.__version__}, "
      f"{threads} threads, encode only | texts | {theirs:.0f} | {theirs_rss:.0f} MB |")
print(f"\nours / sentence-transformers = {ours / theirs:.2f}x")
