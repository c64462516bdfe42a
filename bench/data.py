"""The data path at scale: how memory and start-up grow with the dataset, and whether the loader keeps up.

    python bench/data.py                                    # the config of record: 10,000 and 300,000 images
    python bench/data.py --sizes 200 800 --steps 5 --train-preset tiny --loader-batches 8   # a smoke run

Sections (`--only memory,loader,encode`; default all of them):

- generation: a captioned imagefolder of N --image-px PNGs (one or two coloured shapes, captions such as
  "a red square at the left on a white background", `metadata.jsonl` lines {"file_name", "text"}), written by
  --gen-procs processes under --root and reused while its `.complete` marker matches. Its time is reported.
- memory: a tiny image tokenizer is trained once (20 steps) on the smallest folder, in a cache of its own. Then, for
  each size, with VQGPT_CACHE set to that size's own (emptied) cache: `train.py tokenizer` twice and
  `train.py gpt` twice (--preset tiny, --steps, --batch-size, --workers --train-workers, no mid-run evaluation or
  checkpoint). The first run of each stage is "cold": it fills the cache (the tokenizer's: datasets' Arrow
  conversion and image check; the GPT's: the codes store, the Arrow cache being warm by then); the second is
  "warm", the figure of record (the OS page cache is not dropped between them: that needs root). Each run is a
  subprocess whose process tree (it and its descendants: DataLoader workers, torchrun's ranks) is sampled every
  --poll seconds from /proc: `rss_max_mb`, the largest resident set of one process; `rss_tree_mb`, the peak of the
  tree's summed resident sets (forked workers share their parent's pages, so this counts shared pages once per
  process, an upper bound); `pss_tree_mb`, the peak of the summed proportional set sizes (shared pages split
  between their sharers, also with other programs mapping the same libraries: it moves with whatever else runs);
  `anon_tree_mb`, the peak of the summed proportional anonymous and shared-memory pages (what the tree allocated:
  heap, tensors, DataLoader's shared-memory batches; not libraries or mapped files, so other programs do not move
  it); and `ru_maxrss_mb`, the kernel's peak resident set of the
  process or any of its reaped descendants (os.wait4 on that process: exact, never missed between samples;
  `children_maxrss_mb` is getrusage(RUSAGE_CHILDREN) after the run, the same but cumulative over this script's
  children). Time to the first training step (warm runs): the seconds from the subprocess's start to the moment
  its training progress bar (tqdm, unit "step"; TQDM_MININTERVAL=0 so that every step is printed) first shows a
  finished step (the tokenizer's first batch, DataLoader worker start-up included); `startup_s` is to the bar's
  first appearance (0 steps: data opened, model built). `<stage>_meets_1.25x` in "growth": the warm runs' anon_tree
  and ru_maxrss both grew at most 1.25x from the smallest size to the largest.
- loader: in this process, `vqgpt.loader.image_batches` over `StepImages(load_captioned(folder, "train"))`
  at each --loader-px with each of --loader-workers, --loader-batches batches of --batch-size, on a folder of
  --loader-images PNGs drawn at that pixel size (decoding a 32 px file is not the cost of a 256 px one), or
  on --loader-data FOLDER: flat generated shapes decode much faster than photographs do.
  images/s counts the batches after the first 1 + 4 x workers (the prefetch queue filling);
  `first_batch_s` is the time to the first batch (worker start-up). Beside it, the tokenizer's training
  throughput at the same size: forward + backward + AdamW step of
  `ImageTokenizer(tokenizer_config(--train-preset, image_size=px))` on random batches of --batch-size under
  train.py's --precision auto, median of --train-steps after one warm-up step (the default, the CPU demo's
  preset, is smaller than the 256 px presets f8/f16: a heavier tokenizer only makes the loader's lead larger).
- stream: the folder of each size packed into WebDataset tar shards of --shard-images (KEY.png + KEY.txt, under
  --root, reused while complete), then `train.py tokenizer --streaming` (--steps, as in memory) and
  `python -m vqgpt.encode --streaming --split train` over them, each with its process tree's memory tracked as in
  memory and no cache to fill (a stream copies nothing). `stream_*_growth` in "growth": largest over smallest.
- encode: `python -m vqgpt.encode --data FOLDER --tokenizer TOK --out STORE` on 1 rank, then through
  `torch.distributed.run --standalone --nproc_per_node 2` on 2 ranks, each into a fresh --out, on the
  --encode-size folder (default the largest) with its warm cache. images/s is the command's own figure
  (the last line of its stdout, JSON: images over its encoding seconds); `images_per_s_wall` is images over
  the wall seconds of the whole command, start-up included. The two stores' codes_sha256 are compared.

Every process runs --threads intra-op threads (OMP_NUM_THREADS for the subprocesses, every rank included;
default $OMP_NUM_THREADS, else 1). The table goes to stdout, then one JSON line (also --json) with the device,
CPU model, versions, config, every figure, "growth" (figure at the largest size over the smallest: LOWER is
better; the requirement is <= 1.25 for the warm runs' peak memory) and "ratios" (speed over its peer, above 1
is better: the loader over the tokenizer's training, 2 ranks over 1).
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import platform
import random
import re
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Python puts this script's folder first on sys.path; nothing here should import from it (see bench/sample.py).
sys.path = [p for p in sys.path if Path(p or ".").resolve() != REPO / "bench"]
PAGE = resource.getpagesize()
SECTIONS = ("memory", "loader", "stream", "encode")
GEN_VERSION = 1  # bump when render() changes: existing folders are then rewritten

# ----------------------------------------------------------------------------------------------------
# Generated data

COLORS = {
    "red": (220, 50, 47),
    "green": (60, 170, 70),
    "blue": (40, 90, 220),
    "yellow": (240, 200, 40),
    "purple": (140, 60, 180),
    "orange": (245, 130, 48),
}
BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128)}
SHAPES = ("square", "circle", "triangle")
POSITIONS = {"left": (0.28, 0.5), "right": (0.72, 0.5), "top": (0.5, 0.28), "bottom": (0.5, 0.72), "center": (0.5, 0.5)}


def render(index: int, px: int):
    """Image `index` (deterministic): one or two shapes on a background, and its caption."""
    from PIL import Image, ImageDraw

    rng = random.Random(index)
    bg = rng.choice(list(BACKGROUNDS))
    img = Image.new("RGB", (px, px), BACKGROUNDS[bg])
    draw = ImageDraw.Draw(img)
    parts = []
    for where in rng.sample(list(POSITIONS), 1 + (rng.random() < 0.5)):
        shape, color = rng.choice(SHAPES), rng.choice([c for c in COLORS if c != bg])
        cx, cy = (v * px + rng.uniform(-0.04, 0.04) * px for v in POSITIONS[where])
        r = px * rng.uniform(0.12, 0.2)
        box = (cx - r, cy - r, cx + r, cy + r)
        if shape == "square":
            draw.rectangle(box, fill=COLORS[color])
        elif shape == "circle":
            draw.ellipse(box, fill=COLORS[color])
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLORS[color])
        parts.append(f"{'an' if color[0] in 'aeiou' else 'a'} {color} {shape} at the {where}")
    return img, " and ".join(parts) + f" on a {bg} background"


def _write_range(job):
    folder, start, stop, px = job
    lines = []
    for i in range(start, stop):
        img, caption = render(i, px)
        name = f"{i:07d}.png"
        img.save(os.path.join(folder, name))
        lines.append(json.dumps({"file_name": name, "text": caption}))
    return start, lines


def make_folder(root: Path, n: int, px: int, procs: int) -> tuple[Path, dict]:
    """root/images-{n}-{px}px with n images, reused when its marker says it is complete."""
    folder = root / f"images-{n}-{px}px"
    marker = folder / ".complete"
    want = {"images": n, "px": px, "version": GEN_VERSION}
    if marker.exists() and json.loads(marker.read_text()) == want:
        print(f"data: reusing {folder} ({n:,} images)", flush=True)
        return folder, {"images": n, "px": px, "reused": True}
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    chunk = max(1, min(5000, -(-n // (4 * procs))))
    jobs = [(str(folder), s, min(n, s + chunk), px) for s in range(0, n, chunk)]
    t0 = time.perf_counter()
    done, parts, last = 0, {}, 0.0
    with multiprocessing.get_context("fork").Pool(procs) as pool:
        for start, lines in pool.imap_unordered(_write_range, jobs):
            parts[start] = lines
            done += len(lines)
            if done == n or time.perf_counter() - last > 5:
                last = time.perf_counter()
                print(f"data: {folder.name}: {done:,}/{n:,} images, {last - t0:.0f} s", flush=True)
    with open(folder / "metadata.jsonl", "w") as f:
        for start in sorted(parts):
            f.write("\n".join(parts[start]) + "\n")
    seconds = time.perf_counter() - t0
    size = sum(e.stat().st_size for e in os.scandir(folder) if e.name.endswith(".png"))
    marker.write_text(json.dumps(want))
    print(f"data: wrote {n:,} images ({size / n:.0f} bytes each) in {seconds:.1f} s with {procs} processes", flush=True)
    return folder, {
        "images": n,
        "px": px,
        "reused": False,
        "seconds": round(seconds, 1),
        "mean_file_bytes": round(size / n),
        "procs": procs,
    }


# ----------------------------------------------------------------------------------------------------
# Running a command and watching its process tree

STEP_BAR = re.compile(r"\|\s*(\d+)/(\d+) \[[^\]]*(?:step/s|s/step)")


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])  # the name may hold spaces and parentheses
        kids.setdefault(ppid, []).append(int(entry.name))
    return kids


def _tree(pid: int) -> list[int]:
    kids, out, todo = _children_map(), [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def _memory(pid: int) -> tuple[int, int | None, int | None]:
    """(resident, proportional, proportional anonymous + shared-memory) bytes of one process; the last two are
    None where its smaps_rollup cannot be read; zeros once it is gone."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            rss = int(f.read().split()[1]) * PAGE
    except (OSError, IndexError, ValueError):
        return 0, 0, 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            text = f.read()
    except PermissionError:
        return rss, None, None
    except OSError:  # gone since statm was read
        return rss, 0, 0
    # A zombie (exited, not yet reaped) has no mappings: its rollup is empty.
    kb = {k: int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in text.splitlines()[1:] if ":" in line)}
    return rss, kb.get("Pss", 0), kb.get("Pss_Anon", 0) + kb.get("Pss_Shmem", 0)


def run_tracked(cmd: list[str], env: dict, log: Path, poll: float) -> dict:
    """Run cmd (stdout and stderr into `log`), sampling its process tree's memory every `poll` seconds."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    events = {"bar_s": None, "first_step_s": None, "first_step": None}
    tail: list[str] = []

    def read():
        buf = b""
        with open(log, "wb") as f:
            while True:
                data = os.read(proc.stdout.fileno(), 1 << 16)
                if not data:
                    break
                f.write(data)
                now = time.perf_counter() - t0
                *pieces, buf = re.split(rb"[\r\n]", buf + data)
                for piece in pieces:
                    text = piece.decode(errors="replace")
                    if not text.strip():
                        continue
                    tail.append(text)
                    del tail[:-40]
                    m = STEP_BAR.search(text)
                    if m:
                        if events["bar_s"] is None:
                            events["bar_s"] = now
                        if events["first_step_s"] is None and int(m.group(1)) >= 1:
                            events["first_step_s"], events["first_step"] = now, int(m.group(1))
        if buf.strip():
            tail.append(buf.decode(errors="replace"))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    rss_max = rss_tree = pss_tree = anon_tree = 0
    pss_samples, samples, most_procs = 0, 0, 1
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        tree = _tree(proc.pid)
        most_procs = max(most_procs, len(tree))
        sizes = [_memory(p) for p in tree]
        rss_max = max([rss_max] + [r for r, _, _ in sizes])
        rss_tree = max(rss_tree, sum(r for r, _, _ in sizes))
        if all(p is not None for _, p, _ in sizes):  # another user's process (not readable) leaves it out
            pss_tree = max(pss_tree, sum(p for _, p, _ in sizes))
            anon_tree = max(anon_tree, sum(a for _, _, a in sizes))
            pss_samples += 1
        samples += 1
        time.sleep(poll)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    reader.join(timeout=10)
    mb = 2**20
    out = {
        "rc": proc.returncode,
        "wall_s": round(wall, 2),
        "rss_max_mb": round(rss_max / mb),
        "rss_tree_mb": round(rss_tree / mb),
        "pss_tree_mb": round(pss_tree / mb) if pss_samples else None,
        "anon_tree_mb": round(anon_tree / mb) if pss_samples else None,
        "ru_maxrss_mb": round(usage.ru_maxrss / 1024),
        "children_maxrss_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024),
        "processes": most_procs,
        "samples": samples,
        "pss_samples": pss_samples,
        "log": str(log),
    }
    if events["bar_s"] is not None:
        out["startup_s"] = round(events["bar_s"], 2)
    if events["first_step_s"] is not None:
        out["first_step_s"], out["first_step"] = round(events["first_step_s"], 2), events["first_step"]
    cost = next((t for t in reversed(tail) if t.startswith("cost: {")), None)
    if cost:  # train.py's own account of the run (its peak_memory_mb is ru_maxrss of the main process)
        try:
            out["train_py_cost"] = json.loads(cost[len("cost: ") :])
        except json.JSONDecodeError:
            pass
    out["tail"] = tail
    return out


def last_json(lines: list[str]) -> dict | None:
    for line in reversed(lines):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                return None
    return None


def failed(what: str, r: dict) -> dict:
    text = "\n".join(r["tail"][-15:])
    print(f"{what} failed (exit {r['rc']}); the end of its output (all of it in {r['log']}):\n{text}", flush=True)
    return {"error": f"exit {r['rc']}", "output_tail": r["tail"][-15:], "log": r["log"]}


def clean(r: dict) -> dict:
    return {k: v for k, v in r.items() if k not in ("tail", "rc")}


# ----------------------------------------------------------------------------------------------------
# Sections


def train_cmd(stage: str, folder: Path, out: Path, args, steps: int, tok: Path | None = None) -> list[str]:
    cmd = [
        sys.executable,
        str(REPO / "train.py"),
        stage,
        "--data",
        str(folder),
        "--out",
        str(out),
        "--preset",
        "tiny",
        "--steps",
        str(steps),
        "--batch-size",
        str(args.batch_size),
        "--device",
        args.device,
        "--wandb",
        "disabled",
        "--overwrite",
        "--eval-every",
        "1000000",
        "--save-every",
        "1000000",
        "--workers",
        str(args.train_workers),
    ]
    if stage == "tokenizer" and args.image_px != 32:
        cmd += ["--image-size", str(args.image_px)]
    if tok is not None:
        cmd += ["--tokenizer", str(tok)]
    return cmd


def prepare_tokenizer(args, folders: dict, env: dict) -> Path | None:
    """A tiny tokenizer trained once on the smallest folder, in a cache of its own (the per-size caches stay
    cold for the cold runs); reused when it exists."""
    n = min(folders)
    tok = args.root / "runs" / f"tok-prep-{n}-{args.image_px}px"
    if (tok / "model.safetensors").exists() and (tok / "config.json").exists():
        print(f"tokenizer: reusing {tok}", flush=True)
        return tok
    print(f"tokenizer: training the tiny tokenizer on {n:,} images (20 steps) -> {tok}", flush=True)
    cmd = train_cmd("tokenizer", folders[n], tok, args, 20)
    r = run_tracked(
        cmd, {**env, "VQGPT_CACHE": str(args.root / "cache-prep")}, args.root / "logs" / "tok-prep.log", args.poll
    )
    if r["rc"]:
        failed("training the tokenizer", r)
        return None
    return tok


def memory_section(args, folders: dict, tok: Path | None, env: dict) -> dict:
    out = {}
    for n, folder in sorted(folders.items()):
        cache = args.root / f"cache-{n}-{args.image_px}px"
        if cache.exists():
            shutil.rmtree(cache)  # so that the cold runs are cold
        run_env = {**env, "VQGPT_CACHE": str(cache)}
        res = {}
        for stage in ("tokenizer", "gpt"):
            if stage == "gpt" and tok is None:
                res[stage] = {"skipped": "no tokenizer (its training failed)"}
                continue
            res[stage] = {}
            for phase in ("cold", "warm"):
                run_dir = args.root / "runs" / f"{stage}-{n}"
                cmd = train_cmd(stage, folder, run_dir, args, args.steps, tok if stage == "gpt" else None)
                penv = {**run_env, "TQDM_MININTERVAL": "0"} if phase == "warm" else run_env
                print(f"memory: {n:,} images, {stage}, {phase} ...", flush=True)
                r = run_tracked(cmd, penv, args.root / "logs" / f"{stage}-{n}-{phase}.log", args.poll)
                if r["rc"]:
                    res[stage][phase] = failed(f"train.py {stage} on {n:,} images ({phase})", r)
                    break
                res[stage][phase] = clean(r)
                print(
                    f"memory: {n:,} {stage} {phase}: {r['wall_s']:.1f} s, peak anon {r['anon_tree_mb']} MB / "
                    f"PSS {r['pss_tree_mb']} MB, "
                    f"RSS max {r['rss_max_mb']} MB / tree {r['rss_tree_mb']} MB, first step at "
                    f"{r.get('first_step_s')} s",
                    flush=True,
                )
        res["command"] = {
            stage: " ".join(
                train_cmd(
                    stage, folder, Path(f"RUN-{stage}"), args, args.steps, Path("TOK") if stage == "gpt" else None
                )[1:]
            )
            for stage in ("tokenizer", "gpt")
        }
        out[str(n)] = res
    return out


def growth(memory: dict) -> dict:
    sizes = sorted(int(n) for n in memory)
    if len(sizes) < 2:
        return {}
    small, large = memory[str(sizes[0])], memory[str(sizes[-1])]
    out = {}
    for stage in ("tokenizer", "gpt"):
        for phase in ("warm", "cold"):
            a, b = small.get(stage, {}).get(phase, {}), large.get(stage, {}).get(phase, {})
            for key, label in (
                ("anon_tree_mb", "anon_tree"),
                ("pss_tree_mb", "pss_tree"),
                ("rss_tree_mb", "rss_tree"),
                ("rss_max_mb", "rss_max"),
                ("ru_maxrss_mb", "ru_maxrss"),
                ("first_step_s", "first_step_time"),
                ("wall_s", "wall_time"),
            ):
                if a.get(key) and b.get(key) is not None:
                    out[f"{stage}_{phase}_{label}_growth"] = round(b[key] / a[key], 3)
    for stage in ("tokenizer", "gpt"):  # the requirement: both the tree's footprint and the main process's peak
        figures = [out[k] for k in (f"{stage}_warm_anon_tree_growth", f"{stage}_warm_ru_maxrss_growth") if k in out]
        if figures:
            out[f"{stage}_meets_1.25x"] = max(figures) <= 1.25
    return out


def loader_section(args, env_threads: int) -> tuple[dict, dict]:
    import torch

    from vqgpt import training
    from vqgpt.data import load_captioned
    from vqgpt.loader import StepImages, image_batches
    from vqgpt.tokenizer import ImageTokenizer, tokenizer_config

    torch.set_num_threads(env_threads)
    device = torch.device(args.device)
    os.environ["VQGPT_CACHE"] = str(args.root / "cache-loader")
    loader, train = {}, {}
    for px in args.loader_px:
        if args.loader_data:  # a folder of one's own (photos decode far slower than flat generated shapes)
            folder, res = Path(args.loader_data), {"data": args.loader_data}
        else:
            folder, gen = make_folder(args.root, args.loader_images, px, args.gen_procs)
            res = {"source_px": px, "images_in_folder": args.loader_images, "generation": gen}
        ds = load_captioned(str(folder), "train", image_size=px)
        res.update(train_rows=len(ds), workers={})
        for w in args.loader_workers:
            batches = StepImages(ds, px, global_batch=args.batch_size, per_rank=args.batch_size, rank=0, seed=0)
            warm = min(1 + 4 * w, args.loader_batches // 2)
            t0 = time.perf_counter()
            t_first = t_warm = None
            images = 0
            for i, x in enumerate(image_batches(batches, 0, args.loader_batches, workers=w)):
                if i == 0:
                    t_first = time.perf_counter() - t0
                if i == warm - 1:
                    t_warm = time.perf_counter()
                elif i >= warm:
                    images += len(x)
            t_end = time.perf_counter()
            total = args.loader_batches * args.batch_size
            res["workers"][str(w)] = {
                "images_per_s": round(images / (t_end - t_warm), 1) if images else None,
                "images_per_s_with_startup": round(total / (t_end - t0), 1),
                "first_batch_s": round(t_first, 3),
                "timed_batches": args.loader_batches - warm,
            }
            print(
                f"loader: {px} px, {w} workers: {res['workers'][str(w)]['images_per_s']} images/s "
                f"(first batch {t_first:.2f} s)",
                flush=True,
            )
        loader[str(px)] = res

        # The tokenizer's training step at this size, on random images (what the loader has to keep up with).
        torch.manual_seed(0)
        config = tokenizer_config(args.train_preset, image_size=px)
        model = ImageTokenizer(config).to(device).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95))
        bf16 = training.use_bf16(device, "auto")
        x = torch.rand(args.batch_size, 3, px, px, device=device)
        times = []
        for step in range(args.train_steps + 1):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            with training.autocast(device, bf16):
                recon, _, aux = model(x)
                recon = recon.float()
                loss = torch.nn.functional.l1_loss(recon, x) + torch.nn.functional.mse_loss(recon, x) + aux
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if step:
                times.append(time.perf_counter() - t0)
        step_s = statistics.median(times)
        train[str(px)] = {
            "preset": args.train_preset,
            "image_size": px,
            "batch_size": args.batch_size,
            "bf16": bf16,
            "step_ms": round(1000 * step_s, 1),
            "images_per_s": round(args.batch_size / step_s, 1),
            "timed_steps": len(times),
        }
        print(
            f"train: tokenizer {args.train_preset} at {px} px: {args.batch_size / step_s:.1f} images/s "
            f"({1000 * step_s:.0f} ms a step)",
            flush=True,
        )
        del model, opt
    return loader, train


def encode_section(args, folders: dict, tok: Path | None, env: dict) -> dict:
    if not (REPO / "vqgpt" / "encode.py").exists():
        msg = "skipped: vqgpt/encode.py does not exist in this checkout"
        print(f"encode: {msg}", flush=True)
        return {"skipped": msg}
    if tok is None:
        return {"skipped": "no tokenizer (its training failed)"}
    n = args.encode_size or max(folders)
    folder = folders[n]
    cache = args.root / f"cache-{n}-{args.image_px}px"
    run_env = {**env, "VQGPT_CACHE": str(cache)}
    res = {"images_in_folder": n}
    base = ["-m", "vqgpt.encode", "--data", str(folder), "--tokenizer", str(tok)]
    runs = [
        ("cold", [sys.executable, *base]),
        ("ranks_1", [sys.executable, *base]),
        ("ranks_2", [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *base]),
    ]
    if (cache / "datasets").exists():  # warmed by the memory section: no cold run needed
        runs = runs[1:]
    for name, cmd in runs:
        store = args.root / "stores" / f"{n}-{name}"
        if store.exists():
            shutil.rmtree(store)
        print(f"encode: {n:,} images, {name} ...", flush=True)
        r = run_tracked([*cmd, "--out", str(store)], run_env, args.root / "logs" / f"encode-{n}-{name}.log", args.poll)
        if r["rc"]:
            res[name] = failed(f"vqgpt.encode ({name})", r)
            if name != "cold":
                continue
            break
        splits = encode_splits(last_json(r["tail"]) or {}, store)
        count = sum(v.get("count") or 0 for v in splits.values()) or None
        seconds = [v.get("seconds") for v in splits.values()]
        own = round(count / sum(seconds), 1) if count and seconds and all(seconds) else None
        wall_rate = round(count / r["wall_s"], 1) if count else None
        res[name] = {
            **clean(r),
            "images": count,
            "images_per_s": own or wall_rate,
            "images_per_s_wall": wall_rate,
            "encode_seconds": round(sum(seconds), 2) if own else None,
            "splits": splits,
        }
        print(
            f"encode: {name}: {count} images, {own} images/s by its own clock, "
            f"{wall_rate} images/s over the {r['wall_s']:.1f} s of the command",
            flush=True,
        )
    one, two = (res.get(k, {}).get("splits", {}) for k in ("ranks_1", "ranks_2"))
    sha = [{k: v.get("codes_sha256") for k, v in d.items()} for d in (one, two)]
    if sha[0] and all(sha[0].values()):
        res["same_codes_on_1_and_2_ranks"] = sha[0] == sha[1]
    return res


def make_shards(root: Path, folder: Path, n: int, per_shard: int) -> tuple[Path, int]:
    """The folder's images and captions as tar shards root/shards-{n}/{00000..}.tar; reused when complete."""
    import tarfile

    out = root / f"shards-{n}-{per_shard}"
    marker = out / ".complete"
    want = {"images": n, "per_shard": per_shard, "folder": str(folder)}
    files = -(-n // per_shard)
    if marker.exists() and json.loads(marker.read_text()) == want:
        return out, files
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    lines = (folder / "metadata.jsonl").read_text().splitlines()
    t0 = time.perf_counter()
    for k in range(files):
        with tarfile.open(out / f"{k:05d}.tar", "w") as tar:
            for line in lines[k * per_shard : (k + 1) * per_shard]:
                row = json.loads(line)
                key = row["file_name"].rsplit(".", 1)[0]
                tar.add(folder / row["file_name"], arcname=f"{key}.png")
                caption = row["text"].encode()
                info = tarfile.TarInfo(f"{key}.txt")
                info.size = len(caption)
                tar.addfile(info, io.BytesIO(caption))
    marker.write_text(json.dumps(want))
    print(f"stream: packed {n:,} images into {files} shards in {time.perf_counter() - t0:.1f} s", flush=True)
    return out, files


def stream_section(args, folders: dict, tok: Path | None, env: dict) -> dict:
    out = {}
    for n, folder in sorted(folders.items()):
        shards, files = make_shards(args.root, folder, n, args.shard_images)
        spec = str(shards / f"{{00000..{files - 1:05d}}}.tar")
        cache = args.root / f"cache-stream-{n}"
        if cache.exists():
            shutil.rmtree(cache)
        run_env = {**env, "VQGPT_CACHE": str(cache), "TQDM_MININTERVAL": "0"}
        res = {"files": files}
        tok_cmd = [
            *train_cmd("tokenizer", shards, args.root / "runs" / f"stream-tok-{n}", args, args.steps),
            "--streaming",
        ]
        tok_cmd[tok_cmd.index(str(shards))] = spec
        runs = [("tokenizer", tok_cmd)]
        if tok is not None:
            store = args.root / "stores" / f"stream-{n}"
            if store.exists():
                shutil.rmtree(store)
            runs.append(
                (
                    "encode",
                    [
                        sys.executable,
                        "-m",
                        "vqgpt.encode",
                        "--data",
                        spec,
                        "--streaming",
                        "--split",
                        "train",
                        "--tokenizer",
                        str(tok),
                        "--out",
                        str(store),
                    ],
                )
            )
        for name, cmd in runs:
            print(f"stream: {n:,} images, {name} ...", flush=True)
            r = run_tracked(cmd, run_env, args.root / "logs" / f"stream-{name}-{n}.log", args.poll)
            if r["rc"]:
                res[name] = failed(f"streamed {name} on {n:,} images", r)
                continue
            res[name] = clean(r)
            if name == "encode":
                reported = last_json(r["tail"]) or {}
                res[name].update({k: reported.get(k) for k in ("count", "images_per_s", "codes_sha256")})
            print(
                f"stream: {n:,} {name}: {r['wall_s']:.1f} s, peak anon {r['anon_tree_mb']} MB, ru_maxrss "
                f"{r.get('ru_maxrss_mb')} MB",
                flush=True,
            )
        res["cache_files"] = sum(1 for _ in cache.rglob("*")) if cache.exists() else 0
        res["command"] = {name: " ".join(cmd[1:]) for name, cmd in runs}
        out[str(n)] = res
    sizes = sorted(int(n) for n in out)
    if len(sizes) > 1:
        small, large = out[str(sizes[0])], out[str(sizes[-1])]
        for name in ("tokenizer", "encode"):
            for key in ("anon_tree_mb", "ru_maxrss_mb", "wall_s"):
                a, b = small.get(name, {}).get(key), large.get(name, {}).get(key)
                if a and b is not None:
                    out.setdefault("growth", {})[f"stream_{name}_{key.removesuffix('_mb')}_growth"] = round(b / a, 3)
    return out


def encode_splits(reported: dict, store: Path) -> dict:
    """{split: {count, seconds, images_per_s, codes_sha256, ...}} from vqgpt.encode's JSON line (one store, or
    one per split), else from the manifests it wrote."""
    flat = lambda d: {k: v for k, v in d.items() if not isinstance(v, (list, dict))}
    splits = {k: flat(v) for k, v in reported.items() if isinstance(v, dict) and "count" in v}
    if not splits and "count" in reported:
        splits = {"all": flat(reported)}
    if not splits:
        for manifest in [store / "manifest.json", *sorted(store.glob("*/manifest.json"))]:
            if manifest.exists():
                m = json.loads(manifest.read_text())
                splits[manifest.parent.name] = {"count": m.get("count"), "codes_sha256": m.get("codes_sha256")}
    return splits


# ----------------------------------------------------------------------------------------------------


def parse_only(parser, values: list[str] | None) -> list[str]:
    if not values:
        return list(SECTIONS)
    out = [v.strip() for value in values for v in value.split(",") if v.strip()]
    bad = sorted(set(out) - set(SECTIONS))
    if bad:
        parser.error(f"--only takes {', '.join(SECTIONS)}; got {', '.join(bad)}")
    return [s for s in SECTIONS if s in out]


def table(report: dict) -> None:
    mem = report.get("memory") or {}
    if mem:
        print(
            f"\n{'images':>9} {'stage':9} {'run':5} {'wall s':>8} {'1st step s':>10} {'anon tree':>9} "
            f"{'PSS tree':>9} {'RSS tree':>9} {'RSS max':>8} {'ru_maxrss':>9}  (MB)"
        )
        for n, res in sorted(mem.items(), key=lambda kv: int(kv[0])):
            for stage in ("tokenizer", "gpt"):
                for phase, r in (res.get(stage) or {}).items():
                    if not isinstance(r, dict):
                        print(f"{int(n):>9,} {stage:9} {phase}: {r}")
                        continue
                    if "error" in r:
                        print(f"{int(n):>9,} {stage:9} {phase:5} failed: {r['error']}")
                        continue
                    print(
                        f"{int(n):>9,} {stage:9} {phase:5} {r['wall_s']:>8.1f} {r.get('first_step_s', '-')!s:>10} "
                        f"{r['anon_tree_mb']!s:>9} {r['pss_tree_mb']!s:>9} {r['rss_tree_mb']:>9} "
                        f"{r['rss_max_mb']:>8} {r['ru_maxrss_mb']:>9}"
                    )
    loader, train = report.get("loader") or {}, report.get("train") or {}
    if loader:
        print(f"\n{'px':>4} {'workers':>7} {'loader img/s':>12} {'first batch s':>13} {'train img/s':>11}")
        for px, res in loader.items():
            for w, r in res["workers"].items():
                print(
                    f"{px:>4} {w:>7} {r['images_per_s']!s:>12} {r['first_batch_s']:>13} "
                    f"{train.get(px, {}).get('images_per_s', '-')!s:>11}"
                )
    enc = report.get("encode") or {}
    if enc and "skipped" not in enc:
        print(f"\n{'encode':8} {'images':>8} {'wall s':>8} {'img/s':>9} {'PSS tree MB':>11}")
        for name, r in enc.items():
            if isinstance(r, dict) and "wall_s" in r:
                print(
                    f"{name:8} {r['images']!s:>8} {r['wall_s']:>8.1f} {r['images_per_s']!s:>9} {r['pss_tree_mb']!s:>11}"
                )
    if report.get("growth"):
        print(
            "\ngrowth (largest / smallest, lower is better): "
            + ", ".join(f"{k} {v}" for k, v in report["growth"].items())
        )
    if report.get("ratios"):
        print("ratios (above 1 is better): " + ", ".join(f"{k} {v}" for k, v in report["ratios"].items()))
    print()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 300_000], help="images per generated folder")
    p.add_argument("--root", type=Path, default=Path("/tmp/vqgpt-bench-data"), help="generated data, caches, runs")
    p.add_argument("--steps", type=int, default=50, help="training steps of each train.py run")
    p.add_argument(
        "--only",
        action="append",
        default=None,
        metavar="SECTION",
        help="memory, loader, stream, encode (repeatable or a comma list; default all)",
    )
    p.add_argument("--image-px", type=int, default=32, help="side of the generated images (memory, encode)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="intra-op threads of every process (default: $OMP_NUM_THREADS, else 1)",
    )
    p.add_argument("--train-workers", type=int, default=2, help="train.py --workers of the memory runs")
    p.add_argument("--gen-procs", type=int, default=2, help="processes writing the generated images")
    p.add_argument("--poll", type=float, default=0.1, help="seconds between memory samples")
    p.add_argument("--loader-px", type=int, nargs="+", default=[64, 256])
    p.add_argument("--loader-workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--loader-batches", type=int, default=50)
    p.add_argument("--loader-images", type=int, default=4096, help="images of each generated loader folder")
    p.add_argument(
        "--loader-data",
        default=None,
        metavar="FOLDER",
        help="time the loader on this imagefolder instead of generated ones (resized to each --loader-px)",
    )
    p.add_argument("--train-preset", default="demo", help="tokenizer preset whose training step the loader feeds")
    p.add_argument("--train-steps", type=int, default=5, help="timed training steps (after one warm-up)")
    p.add_argument("--encode-size", type=int, default=None, help="folder size to encode (default: the largest)")
    p.add_argument("--shard-images", type=int, default=1000, help="images per tar shard of the stream section")
    p.add_argument("--json", default=None, help="also write the JSON here")
    args = p.parse_args()
    only = parse_only(p, args.only)
    threads = args.threads or int(os.environ.get("OMP_NUM_THREADS") or 1)
    if args.encode_size and args.encode_size not in args.sizes:
        p.error(f"--encode-size {args.encode_size} is not one of --sizes {args.sizes}")
    args.root = args.root.resolve()
    (args.root / "logs").mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    env.pop("VQGPT_CACHE", None)
    env.pop("TQDM_MININTERVAL", None)
    t_start = time.perf_counter()

    import torch

    from vqgpt.training import cpu_name

    report = {
        "bench": "data",
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "cpu_model": cpu_name(),
        "cpus": len(os.sched_getaffinity(0)),
        "bf16": bool(torch.cpu._is_avx512_bf16_supported()),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "command": " ".join(["python", *sys.argv]),
    }
    import datasets

    report["versions"] = {
        "torch": torch.__version__,
        "datasets": datasets.__version__,
        "python": platform.python_version(),
    }
    report["config"] = {
        "sizes": args.sizes,
        "image_px": args.image_px,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "threads": threads,
        "train_workers": args.train_workers,
        "poll_s": args.poll,
        "sections": only,
        "root": str(args.root),
    }
    report["sizes"] = args.sizes
    folders, gen = {}, {}
    if "memory" in only or "encode" in only or "stream" in only:
        for n in sorted(set(args.sizes)):
            folders[n], gen[str(n)] = make_folder(args.root, n, args.image_px, args.gen_procs)
    report["generation"] = gen
    tok = prepare_tokenizer(args, folders, env) if folders else None
    report["tokenizer_run"] = str(tok) if tok else None
    ratios = {}
    if "memory" in only:
        report["memory"] = memory_section(args, folders, tok, env)
        report["growth"] = growth(report["memory"])
    if "loader" in only:
        report["loader"], report["train"] = loader_section(args, threads)
        report["config"].update(
            loader_px=args.loader_px,
            loader_workers=args.loader_workers,
            loader_batches=args.loader_batches,
            loader_images=args.loader_images,
            loader_data=args.loader_data,
            train_preset=args.train_preset,
            train_steps=args.train_steps,
        )
        for px, res in report["loader"].items():
            for w, r in res["workers"].items():
                if r["images_per_s"]:
                    ratios[f"loader_{px}px_{w}w_over_train"] = round(
                        r["images_per_s"] / report["train"][px]["images_per_s"], 2
                    )
    if "stream" in only:
        report["stream"] = stream_section(args, folders, tok, env)
        report["config"]["shard_images"] = args.shard_images
    if "encode" in only:
        report["encode"] = encode_section(args, folders, tok, env)
        one, two = (report["encode"].get(k, {}).get("images_per_s") for k in ("ranks_1", "ranks_2"))
        if one and two:
            ratios["encode_2_ranks_over_1"] = round(two / one, 2)
    report["ratios"] = ratios
    report["notes"] = (
        "growth: figure at the largest size over the smallest, LOWER is better (requirement: warm peak memory "
        "<= 1.25x, judged on anon_tree and ru_maxrss; anon_tree is the process tree's summed proportional anonymous + "
        "shared-memory pages, pss_tree its summed proportional set size, rss_tree counts pages shared "
        "with forked workers once per process, rss_max is the largest single process, ru_maxrss the kernel's "
        "peak of one process). ratios: speed over its peer, above 1 is better (loader images/s over the "
        "tokenizer's training images/s at that size; encode on 2 ranks over 1). first_step_s: seconds from "
        "the subprocess's start to its progress bar's first finished step, on the warm cache."
    )
    report["bench_seconds"] = round(time.perf_counter() - t_start, 1)
    table(report)
    line = json.dumps(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    print(line)


if __name__ == "__main__":
    main()
