#!/usr/bin/env python3
"""Share of a profile's samples per category, from folded stacks.

Reads a folded-stacks file (`inferno-collapse-perf` output: one line per distinct stack,
`thread;outermost;...;innermost WEIGHT`) and attributes each stack's weight to the category of
its innermost recognisable frame: walking from the leaf towards the root, the first frame that
names a known library, kernel subsystem or Muster crate decides. Frames that name nothing in
particular (core/std glue, closures, generic helpers, unknown symbols) are passed over, so a
sample in `core::fmt` under `serde_json` counts as JSON, and one in `memcpy` under SQLite counts
as copying. Stacks where nothing is recognised count as "other".

Usage: scripts/profile_breakdown.py FOLDED [--other N] [--threads]
  --other N   also list the N heaviest leaf frames of the "other" category (to refine patterns)
  --threads   also list the share per thread name (the folded stacks' first frame)
scripts/profile.sh runs it on MODE.folded and writes MODE.breakdown.txt.
"""

import argparse
import re
import sys
from collections import Counter

# (category, crate names, C/kernel symbol regex), in the order the table prints. A Rust frame
# is matched by its crate (the first path segment once generic arguments are removed; for
# `<Type as Trait>::f`, the crate of Type); any other frame by the regex on its symbol.
CATEGORIES = [
    ("SQLite", {"rusqlite", "libsqlite3_sys"}, r"^sqlite3"),
    (
        "allocation and copying",
        {"mimalloc", "libmimalloc_sys"},
        r"^_?mi_|^(__libc_|_int_)?(malloc|calloc|realloc|free|cfree)$|^malloc_consolidate"
        r"|^(__)?mem(cpy|move|set)|__rust_(alloc|dealloc|realloc|alloc_zeroed|no_alloc)"
        r"|^alloc::(alloc|raw_vec)::",
    ),
    (
        "kernel scheduling and futexes",
        set(),
        r"^(__)?schedule|^finish_task_switch|^context_switch|^__switch_to|^pick_next_task"
        r"|futex|^__lll_lock_wa|^try_to_wake_up|^__wake_up|^wake_up_|^wake_q|^ttwu_"
        r"|^(__)?(en|de)queue_task|^(__)?sched_|^std::sys::sync::|^parking_lot_core::",
    ),
    (
        "fsync and disk I/O",
        set(),
        r"^(__x64_sys_|do_|vfs_)?f(data)?sync|^(__)?ext4_|^(__)?jbd2|^(__)?blk_|^(__)?bio_"
        r"|^submit_bio|^virtblk|^iomap_|^(ksys|__x64_sys|__libc)_p(read|write)64"
        r"|^file_write_and_wait|^(__)?filemap_(write|fdatawait)",
    ),
    ("TLS", {"rustls", "tokio_rustls", "ring", "webpki", "rustls_webpki"}, r"^ring_core_|aws_lc"),
    ("sealing", {"chacha20", "poly1305", "chacha20poly1305", "aead", "universal_hash"}, None),
    ("HMAC and SHA-2 (attestation, tokens)", {"hmac", "sha2", "digest", "block_buffer"}, None),
    ("JSON", {"serde_json", "serde", "serde_core"}, None),
    (
        "HTTP",
        {"hyper", "hyper_util", "httparse", "http", "http_body", "http_body_util", "axum",
         "axum_core", "tower", "tower_http", "tower_service", "tower_layer", "matchit"},
        None,
    ),
    ("MQTT codec", {"rumqttc", "mqttbytes"}, None),
    ("AMQP", {"fe2o3_amqp", "serde_amqp", "fe2o3_amqp_types"}, None),
    (
        "kernel networking",
        set(),
        r"^(__)?(tcp|tcp_v4|ip|ipv4|ipv6|inet|sock|sk|skb|udp|netif|napi|net_rx|loopback)_"
        r"|^(__)?(kfree|alloc|consume)_skb|^(__)?dev_(hard_start|queue)_xmit|^process_backlog"
        r"|^(__)?sys_(send|recv)|^__x64_sys_(send|recv)|^(release|lock)_sock"
        r"|^std::sys::net::|^(__GI___|__libc_)?(writev|readv|send|recv|sendto|recvfrom|sendmsg"
        r"|recvmsg)$",
    ),
    ("tokio runtime", {"tokio", "tokio_util", "mio"}, None),
    (
        "tracing, logging, metrics",
        {"tracing", "tracing_core", "tracing_subscriber", "tracing_log", "log", "metrics",
         "metrics_util", "metrics_exporter_prometheus"},
        None,
    ),
]
SEALING_MODULE = re.compile(r"^muster_store::sealing\b")
MUSTER = "Muster's own code"
OTHER = "other"
ORDER = [c[0] for c in CATEGORIES] + [MUSTER, OTHER]
_REGEXES = [(name, re.compile(rx)) for name, _, rx in CATEGORIES if rx]
_CRATES = {crate: name for name, crates, _ in CATEGORIES for crate in crates}
_SUFFIX = re.compile(r"_\[[kijw]\]$")


def strip_generics(text):
    """Drops every `<...>` group; `->` in function pointer types is not a bracket."""
    text = text.replace("->", "\u2192")
    out, depth = [], 0
    for ch in text:
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth = max(0, depth - 1)
        elif depth == 0:
            out.append(ch)
    return "".join(out)


def subject(frame):
    """The path a frame is about: `<Type as Trait>::f` -> `Type::f`, generics removed."""
    frame = _SUFFIX.sub("", frame.strip())
    if frame.startswith("<"):
        depth = 0
        for i, ch in enumerate(frame):
            if ch == "<":
                depth += 1
            elif ch == ">":
                depth -= 1
                if depth == 0:
                    inner, rest = frame[1:i], frame[i + 1:]
                    break
            elif depth == 1 and frame.startswith(" as ", i):
                inner, rest = frame[1:i], ""
                close = frame.find(">::", i)
                if close >= 0:
                    rest = frame[close + 1:]
                break
        else:
            inner, rest = frame[1:], ""
        frame = inner + rest
    return strip_generics(frame).strip()


def classify_frame(frame):
    """The category a frame names, or None when it names nothing recognisable."""
    path = subject(frame)
    if not path:
        return None
    if "::" in path:
        if SEALING_MODULE.match(path):
            return "sealing"
        crate = path.split("::", 1)[0].lstrip("&*")
        if crate in _CRATES:
            return _CRATES[crate]
        if crate == "muster" or crate.startswith("muster_"):
            return MUSTER
        # std/core/alloc paths: only the allocator's and std's lock internals are recognised.
    for name, rx in _REGEXES:
        if rx.search(path):
            return name
    return None


def classify_stack(frames):
    """The category of a stack (root first; the thread name, frame 0, is not a frame)."""
    for frame in reversed(frames[1:]):
        category = classify_frame(frame)
        if category:
            return category
    return OTHER


def parse_line(line):
    stack, _, weight = line.rstrip("\n").rpartition(" ")
    if not stack:
        return None
    try:
        return stack.split(";"), int(weight)
    except ValueError:
        return None


def breakdown(lines):
    """(weight per category, weight per thread, heaviest 'other' leaves, total weight)."""
    categories, threads, other_leaves = Counter(), Counter(), Counter()
    for line in lines:
        parsed = parse_line(line)
        if parsed is None:
            continue
        frames, weight = parsed
        category = classify_stack(frames)
        categories[category] += weight
        threads[frames[0]] += weight
        if category == OTHER:
            other_leaves[frames[-1]] += weight
    return categories, threads, other_leaves, sum(categories.values())


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folded")
    parser.add_argument("--other", type=int, default=0, metavar="N")
    parser.add_argument("--threads", action="store_true")
    args = parser.parse_args()
    with open(args.folded, encoding="utf-8", errors="replace") as f:
        categories, threads, other_leaves, total = breakdown(f)
    if total == 0:
        print(f"{args.folded}: no samples", file=sys.stderr)
        return 1
    print(f"{args.folded}: share of samples by the innermost recognisable frame")
    for name in sorted(ORDER, key=lambda n: -categories[n]):
        if categories[name]:
            print(f"  {name:38} {100 * categories[name] / total:5.1f}%")
    if args.threads:
        print("by thread:")
        for name, weight in threads.most_common():
            print(f"  {name:38} {100 * weight / total:5.1f}%")
    if args.other:
        print(f"heaviest leaves counted as {OTHER}:")
        for name, weight in other_leaves.most_common(args.other):
            print(f"  {100 * weight / total:5.1f}%  {name[:110]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
