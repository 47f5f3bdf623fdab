"""Markdown tables from the committed benchmark results (bench/results/*.json).

    python bench/report.py                                             # print the tables
    python bench/report.py --readme README.md --docs docs/benchmarks.md  # rewrite both blocks

``--readme`` rewrites the headline block (``<!-- bench-headline:begin -->`` ... ``end``): one row per
result file with its headline ratios, and where, how and on what it was measured. ``--docs`` rewrites the
full tables block (``<!-- bench-tables:begin -->`` ... ``end``) of the benchmarks page. The
reproduction's block has its own generator, the one that writes its results:
`python experiments/tev_repro.py --only-plots --out experiments/results/cpu --page docs/reproduction.md`.

Every table is preceded by the line that produced it: command, device, versions, commit and date, all
read from the result file's metadata. Nothing here measures anything. A result file that is not JSON or
lacks a field is named in a one-line error. Every block is rendered and found before any file is written,
each file through a temporary file, so a bad result file or a missing block leaves them all as they were.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import sys


class ReportError(Exception):
    """A one-line error about a named file."""

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
BEGIN, END = "<!-- bench-tables:begin -->", "<!-- bench-tables:end -->"
HEADLINE_BEGIN, HEADLINE_END = "<!-- bench-headline:begin -->", "<!-- bench-headline:end -->"


def provenance(meta: dict, path: pathlib.Path) -> str:
    versions = f"torch {meta['torch']}, Triton {meta.get('triton') or 'n/a'}, CUDA {meta.get('cuda') or 'n/a'}"
    where = meta["device"] + (f" ({meta['threads']} threads)" if meta.get("threads") else "")
    command = meta.get("command", "(command not recorded)")
    return (
        f"`{command}` on {where}; {versions}; commit `{meta['commit']}`, {meta['date']}. "
        f"Source: `{path.relative_to(ROOT).as_posix()}`."
    )


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def tev_table(data: dict) -> str:
    header = ["V × d", "dtype", "tev GB/s", "one-liner GB/s", "speed-up", "E.sum() GB/s", "tev / sum"]
    rows = []
    for r in data["rows"]:
        rows.append([
            f"{r['shape'][0]:,} × {r['shape'][1]:,}", r["dtype"], f"{r['gbps']:.1f}", f"{r['one_liner_gbps']:.2f}",
            f"{r['speedup_vs_one_liner']:.1f}×", f"{r['sum_gbps']:.1f}" if r.get("sum_gbps") else "–",
            f"{100 * r['fraction_of_sum_read_rate']:.0f}%" if r.get("fraction_of_sum_read_rate") else "–",
        ])
    return table(header, rows)


def mlra_table(data: dict) -> str:
    header = ["model", "T", "g", "r", "dtype", "path", "ours fwd+bwd ms", "unfused MLRA ms", "MHA ms",
              "f+b vs unfused", "f+b vs MHA", "fwd vs MHA", "saved for bwd vs unfused"]
    rows = []
    for r in data["rows"]:
        rows.append([
            r["model"], str(r["T"]), str(r["g"]), str(r["r"]), r["dtype"], r.get("path", "–"),
            f"{r['ours_fwdbwd_ms']:.3f}", f"{r['unfused_fwdbwd_ms']:.3f}", f"{r['mha_fwdbwd_ms']:.3f}",
            f"{r['speedup_fwdbwd_vs_unfused']:.2f}×", f"{r['mha_fwdbwd_ms'] / r['ours_fwdbwd_ms']:.2f}×",
            f"{r['speedup_fwd_vs_mha']:.2f}×", f"{r['saved_ratio_vs_unfused']:.2f}×",
        ])
    return table(header, rows)


def _span(values: list[float], digits: int = 2) -> str:
    lo, hi = (f"{v:.{digits}f}" for v in (min(values), max(values)))
    return f"{lo}×" if lo == hi else f"{lo}–{hi}×"


def mlra_headline(data: dict) -> str:
    """The ratios the targets are stated in, by shape class: wide latents (g = 1) and narrow ones (attention
    on the latents: ``2·max(16, r) <= d_h``)."""
    rows = data["rows"]
    parts = []
    for label, pick in (("g = 1", lambda r: r["g"] == 1),
                        ("narrow latents", lambda r: 2 * max(16, r["r"]) <= r["d_h"])):
        sel = [r for r in rows if pick(r)]
        if not sel:
            continue
        parts.append(
            f"{label} ({len(sel)} rows): forward+backward {_span([r['speedup_fwdbwd_vs_unfused'] for r in sel])} "
            f"unfused MLRA and {_span([r['mha_fwdbwd_ms'] / r['ours_fwdbwd_ms'] for r in sel])} MHA, forward "
            f"{_span([r['speedup_fwd_vs_mha'] for r in sel])} MHA, saved for backward "
            f"{_span([r['saved_ratio_vs_unfused'] for r in sel])} unfused"
        )
    return "; ".join(parts) + "." if parts else ""


def decode_headline(data: dict) -> str:
    """MLRA's decode speed-up over MHA at 2,048 cached tokens and more, per variant, with its batch range."""
    steps = [r for r in data["rows"] if r["op"] == "decode_step" and r["S"] >= 2048 and r.get("speedup_vs_mha")]
    parts = []
    for v in dict.fromkeys(r["variant"] for r in steps):
        if v == "mha":
            continue
        sel = [r for r in steps if r["variant"] == v]
        worst = min(sel, key=lambda r: r["speedup_vs_mha"])
        parts.append(f"{v} {_span([r['speedup_vs_mha'] for r in sel])} (lowest at B = {worst['B']}, S = {worst['S']:,})")
    return ("At 2,048 cached tokens and more, step speed-up over MHA: " + "; ".join(parts) + ".") if parts else ""


def decode_table(data: dict) -> str:
    """One line per (B, S): the step time of each variant and MLRA's speed-up over MHA; then generate()."""
    steps = [r for r in data["rows"] if r["op"] == "decode_step"]
    variants = list(dict.fromkeys(r["variant"] for r in steps))
    by = {(r["B"], r["S"], r["variant"]): r for r in steps}
    header = ["B", "cached S"] + [f"{v} ms" for v in variants] + [f"{v} vs MHA" for v in variants if v != "mha"]
    header += ["MHA cache / MLRA cache", "best % of read bw"]
    rows = []
    for B, S in dict.fromkeys((r["B"], r["S"]) for r in steps):
        cells = [by.get((B, S, v)) for v in variants]
        line = [str(B), f"{S:,}"] + [f"{c['ms']:.3f}" if c else "–" for c in cells]
        line += [f"{c['speedup_vs_mha']:.2f}×" if c and c.get("speedup_vs_mha") else "–"
                 for c, v in zip(cells, variants) if v != "mha"]
        mha, mlra = by.get((B, S, "mha")), by.get((B, S, "mlra-g1"))
        line.append(f"{mha['cache_numbers_per_token'] / mlra['cache_numbers_per_token']:.0f}×" if mha and mlra else "–")
        line.append(f"{100 * max(c['fraction_of_read_bw'] for c in cells if c):.0f}%")
        rows.append(line)
    out = table(header, rows)
    gen = [r for r in data["rows"] if r["op"] == "generate"]
    if gen:
        def spread(r):  # rounds timed round by round (older files: one timing)
            if "tokens_per_s_p20" not in r:
                return "–"
            return f"{r['tokens_per_s_p20']:.1f}–{r['tokens_per_s_p80']:.1f} ({r['rounds']} rounds)"

        out += "\n\n" + table(
            ["generate()", "B", "prompt", "new tokens", "tokens/s (median)", "p20–p80"],
            [[r["variant"], str(r["B"]), str(r["prompt"]), str(r["new_tokens"]), f"{r['tokens_per_s']:.1f}", spread(r)]
             for r in gen],
        )
    return out


def pytest_benchmark_table(data: dict, path: pathlib.Path) -> str:
    """A pytest-benchmark JSON file: one table, rows grouped, each with its ratio to its group's fastest."""
    m, c = data["machine_info"], data["commit_info"]
    head = (
        f"`{m.get('command', 'pytest bench/test_bench_cpu.py --benchmark-only')}` on {m.get('device', m.get('cpu', {}).get('brand_raw'))} "
        f"({m.get('torch_threads')} threads); torch {m.get('torch')}, Triton {m.get('triton')}; "
        f"commit `{c['id'][:12]}{'-dirty' if c.get('dirty') else ''}`, {data['datetime'][:19]}Z. "
        f"Source: `{path.relative_to(ROOT).as_posix()}`."
    )
    rows, groups = [], {}
    for b in data["benchmarks"]:
        groups.setdefault(b["group"], []).append(b)
    for group, items in groups.items():
        best = min(b["stats"]["median"] for b in items)
        for b in sorted(items, key=lambda b: b["stats"]["median"]):
            impl = b["name"].split("[", 1)[1].rstrip("]") if "[" in b["name"] else b["name"]
            rows.append([group, impl, f"{1e3 * b['stats']['median']:.2f}", f"{b['stats']['median'] / best:.2f}×"])
    return head + "\n\n" + table(["case", "implementation", "median ms", "vs fastest"], rows)


def _results(results: pathlib.Path):
    """(path, data) of every result file, the training benchmark first, then decoding, then the rest."""
    order = {"mlra": 0, "decode": 1}
    for path in sorted(results.glob("*.json"), key=lambda p: (order.get(p.name.split("_")[0], 2), p.name)):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as err:
            raise ReportError(f"{path}: cannot read it as JSON ({' '.join(str(err).split())})") from None
        if not isinstance(data, dict):
            raise ReportError(f"{path}: expected a JSON object, got {type(data).__name__}")
        yield path, data


def _malformed(path: pathlib.Path, err: Exception) -> ReportError:
    what = f"no field {err.args[0]!r}" if isinstance(err, KeyError) else f"a malformed field ({err})"
    return ReportError(f"{path}: {what}; is it a result file of bench/bench_*.py?")


_FIELD_ERRORS = (KeyError, TypeError, ValueError, IndexError, AttributeError)


def render(results: pathlib.Path = RESULTS) -> str:
    """The full tables, one per result file, each under the line that produced it."""
    parts = []
    for path, data in _results(results):
        try:
            if "benchmarks" in data and "machine_info" in data:
                parts.append(f"**CPU, pytest-benchmark.** {pytest_benchmark_table(data, path)}")
                continue
            if not data.get("rows"):
                continue
            if path.name.startswith("tev_"):
                title, body = f"TEV reduction, {data['meta']['device_type'].upper()}", tev_table(data)
            elif path.name.startswith("decode_"):
                dtypes = ", ".join(dict.fromkeys(r["dtype"] for r in data["rows"] if r["op"] == "decode_step"))
                title = f"Decode step on the KV cache, {data['meta']['device_type'].upper()}, {dtypes}"
                body = decode_table(data)
                headline = decode_headline(data)
                body = f"{headline}\n\n{body}" if headline else body
            elif path.name.startswith("mlra_"):
                smoke = "smoke" in path.name
                title = "MLRA attention, training and prefill" + (" (smoke shapes, not a speed result)" if smoke else "")
                body = mlra_table(data)
                headline = "" if smoke else mlra_headline(data)
                body = f"{headline}\n\n{body}" if headline else body
            else:
                continue
            parts.append(f"**{title}.** {provenance(data['meta'], path)}\n\n{body}")
        except _FIELD_ERRORS as err:
            raise _malformed(path, err) from None
    if not parts:
        return "_No benchmark results are committed yet._"
    return "\n\n".join(parts)


def _values(rows: list[dict], key: str, fmt: str = "{}") -> str:
    vals = list(dict.fromkeys(r[key] for r in rows))
    return fmt.format(vals[0]) if len(vals) == 1 else f"{fmt.format(min(vals))}–{fmt.format(max(vals))}"


def _headline_row(path: pathlib.Path, data: dict) -> list[str] | None:
    """[what was timed, its headline ratios]; None for a file with no headline (smoke shapes, profiles)."""
    rows = data.get("rows")
    if not rows:
        return None
    if path.name.startswith("mlra_") and "smoke" not in path.name:
        what = (f"MLRA layer, forward+backward (d = {_values(rows, 'd')}, H = {_values(rows, 'H')}, "
                f"T = {_values(rows, 'T')}, {_values(rows, 'dtype')})")
        parts = []
        # Wide latents at g = 1, and grouped narrow ones (attention on the latents, 2·max(16, r) <= d_h).
        for pick in (lambda r: r["g"] == 1, lambda r: r["g"] > 1 and 2 * max(16, r["r"]) <= r["d_h"]):
            sel = [r for r in rows if pick(r)]
            if sel:
                parts.append(f"g = {_values(sel, 'g')}, r = {_values(sel, 'r')}: "
                             f"{_span([r['speedup_fwdbwd_vs_unfused'] for r in sel])} unfused MLRA, "
                             f"{_span([r['mha_fwdbwd_ms'] / r['ours_fwdbwd_ms'] for r in sel])} MHA")
        return [what, "; ".join(parts)] if parts else None
    if path.name.startswith("decode_"):
        steps = [r for r in rows if r["op"] == "decode_step"]
        long = [r for r in steps if r["S"] >= 2048]
        if not long:
            return None
        what = (f"decode step of one layer (d = {_values(steps, 'd')}, H = {_values(steps, 'H')}, "
                f"{_values(steps, 'dtype')}, B = {_values(long, 'B')}, {_values(long, 'S', '{:,}')} cached tokens)")
        parts = []
        for v in dict.fromkeys(r["variant"] for r in long):
            if v == "mha" or v.endswith("-torch"):
                continue
            sel = [r for r in long if r["variant"] == v and r.get("speedup_vs_mha")]
            if sel:
                label = f"g = {_values(sel, 'g')}, r = {_values(sel, 'r')}" if sel[0].get("g") else v
                parts.append(f"{label}: {_span([r['speedup_vs_mha'] for r in sel])} MHA")
        per_token = {r["variant"]: r["cache_numbers_per_token"] for r in steps}
        if "mha" in per_token and "mlra-g1" in per_token:
            parts.append(f"cache {per_token['mha'] / per_token['mlra-g1']:.0f}× smaller")
        return [what, "; ".join(parts)] if parts else None
    if path.name.startswith("tev_"):
        shapes = [r["shape"] for r in rows]
        what = (f"TEV reduction ({min(s[0] for s in shapes):,} to {max(s[0] for s in shapes):,} rows × "
                f"{_values([{'d': s[1]} for s in shapes], 'd', '{:,}')}, {', '.join(dict.fromkeys(r['dtype'] for r in rows))})")
        fractions = [r["fraction_of_sum_read_rate"] for r in rows if r.get("fraction_of_sum_read_rate")]
        result = f"{_span([r['speedup_vs_one_liner'] for r in rows], 1)} `torch.std(E.float(), dim=1)`"
        if fractions:
            result += f"; {100 * min(fractions):.0f}–{100 * max(fractions):.0f}% of `E.sum()`'s read rate"
        return [what, result]
    return None


def headline(results: pathlib.Path = RESULTS) -> str:
    """The README's small table: one row per result file, its headline ratios and where it was measured."""
    rows, device_types = [], set()
    for path, data in _results(results):
        try:
            if "meta" not in data:
                continue
            row = _headline_row(path, data)
            if row is None:
                continue
            meta = data["meta"]
            device_types.add(meta["device_type"])
            where = f"{meta['device']} ({meta['device_type'].upper()}" + (
                f", {meta['threads']} threads)" if meta.get("threads") else ")")
            versions = f"torch {meta['torch']}" + (f", Triton {meta['triton']}" if meta.get("triton") else "")
            rows.append(row + [f"`{meta.get('command', '(command not recorded)')}`", where, versions,
                               f"`{meta['commit']}`, {meta['date'][:10]}"])
        except _FIELD_ERRORS as err:
            raise _malformed(path, err) from None
    if not rows:
        return "_No benchmark results are committed yet._"
    lines = ["| benchmark | speed-up: the baseline's time / ours | command | device | versions | commit, date |",
             "|---|---|---|---|---|---|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    note = "Both sides of a ratio are timed in the same run; above 1× is faster."
    if "cuda" not in device_types:
        note += " No GPU result is committed yet: every figure here was measured on a CPU."
    return "\n".join(lines) + "\n\n" + note


def _replace_block(doc: str, begin: str, end: str, text: str, name: str) -> str:
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if not pattern.search(doc):
        raise ReportError(f"{name}: no '{begin}' ... '{end}' block to rewrite")
    return pattern.sub(lambda _: f"{begin}\n{text}\n{end}", doc)


def _write_atomic(path: pathlib.Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        if path.exists():
            os.chmod(tmp, path.stat().st_mode & 0o7777)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _read(flag: str, path: pathlib.Path) -> str:
    if not path.exists():
        raise ReportError(f"{flag} {path}: no such file")
    if not path.is_file():
        raise ReportError(f"{flag} {path}: not a regular file")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ReportError(f"{flag} {path}: cannot read it ({getattr(err, 'strerror', None) or err})") from None


def run(args: argparse.Namespace) -> None:
    # (flag, file, markers, what the block holds, how to render it)
    targets = [t for t in (("--readme", args.readme, HEADLINE_BEGIN, HEADLINE_END, "headline", headline),
                           ("--docs", args.docs, BEGIN, END, "tables", render)) if t[1] is not None]
    if not targets:
        print(render())
        print("\n" + headline())
        return
    new = [(flag, path, _replace_block(_read(flag, path), begin, end, make(), str(path)), what)
           for flag, path, begin, end, what, make in targets]
    for flag, path, doc, what in new:
        try:
            _write_atomic(path, doc)
        except OSError as err:
            raise ReportError(f"{flag} {path}: cannot write it ({err.strerror or err}); it was left as it was") from None
        print(f"rewrote the {what} block of {path}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--readme", type=pathlib.Path, metavar="PATH",
                   help=f"rewrite the headline table between {HEADLINE_BEGIN} and {HEADLINE_END} of PATH (README.md)")
    p.add_argument("--docs", type=pathlib.Path, metavar="PATH",
                   help=f"rewrite the full tables between {BEGIN} and {END} of PATH (docs/benchmarks.md)")
    args = p.parse_args(argv)
    try:
        run(args)
    except ReportError as err:
        print(f"report.py: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
