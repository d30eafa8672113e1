"""The fuzzing engine shared by bench/fuzz.py and tests/unit/test_fuzz_parsers.py.

A driver feeds one input (bytes) to one parser of the product, in-process, and either
returns (the parser accepted the input) or lets one of the errors the parser is allowed
to raise go through (``Driver.allowed``: the product's own error classes, or for a
server the documented ways of closing a connection). Anything else is a crash; so is
an unexpected failure the product only logged (an error record with a traceback), an
exception in a thread, or an asyncio task that failed unnoticed (``Problems``). An input
that takes longer than the time limit is a hang: a timer interrupts it.

Inputs come from the driver's seeds (real frames and files made by the product) through
a mutation engine: a seed is a list of frames, each with the offsets of its integer
fields, so that a mutation can set a length or a count to an extreme value, drop, repeat,
swap or splice whole frames, and then flip bits, cut, insert and overwrite bytes (tokens
of the driver's dictionary among them). Purely random inputs are mixed in. Every choice
is an integer, so the same mutations come from a seeded ``random.Random`` (the bench) or
from hypothesis (the tests), and an input is reproduced from the run's seed alone.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import os
import random
import re
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence


# -- inputs -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Field:
    """An integer field of a frame: where it is, its width in bytes and byte order."""

    offset: int
    width: int
    order: str = "little"


@dataclass(frozen=True)
class Frame:
    data: bytes
    fields: tuple[Field, ...] = ()


@dataclass(frozen=True)
class Seed:
    """A valid input, as the frames (or one blob) it is made of."""

    frames: tuple[Frame, ...]
    name: str = ""

    @property
    def data(self) -> bytes:
        return b"".join(f.data for f in self.frames)


def seed(name: str, *frames: Frame | bytes) -> Seed:
    return Seed(tuple(f if isinstance(f, Frame) else Frame(f) for f in frames), name)


# Values an integer field is set to: the edges of every width, small lengths, powers of two.
EXTREMES = (0, 1, 2, 3, 4, 7, 8, 15, 16, 31, 32, 64, 127, 128, 255, 256, 511, 512, 4095,
            4096, 4097, 65535, 65536, 65537, 1 << 20, (1 << 20) + 1, 4 << 20, 32 << 20,
            (1 << 31) - 1, 1 << 31, (1 << 32) - 1, 1 << 32, (1 << 60), (1 << 63) - 1,
            1 << 63, (1 << 64) - 1, (1 << 64) - 4096)
INTERESTING_BYTES = (0, 1, 0x7F, 0x80, 0xFF, 0x20, 0x22, 0x5C, 0x0A, 0x00)

# Mutation operators (the first number of an op); the other three numbers are its
# arguments, taken modulo whatever they index.
FIELD, DROP, REPEAT, SWAP, SPLICE = range(5)           # on frames, before they are joined
FLIP, BYTE, INT, CUT, DELETE, INSERT, TOKEN, DUPLICATE, TAIL = range(5, 14)   # on bytes
N_OPS = 14
Op = tuple[int, int, int, int]


def mutate(base: Seed, ops: Sequence[Op], pool: Sequence[Seed], dictionary: Sequence[bytes],
           max_size: int) -> bytes:
    """``base`` changed by ``ops`` (frame operators first, then byte operators);
    ``pool`` gives the frames a splice takes, ``dictionary`` the tokens."""
    frames = list(base.frames)
    for op, a, b, c in ops:
        if op == FIELD and frames:
            i = a % len(frames)
            frame = frames[i]
            if frame.fields:
                f = frame.fields[b % len(frame.fields)]
                value = EXTREMES[c % len(EXTREMES)]
                if c // len(EXTREMES) % 4 == 1:       # near the edge: one less
                    value = max(0, value - 1)
                elif c // len(EXTREMES) % 4 == 2:     # an arbitrary value
                    value = c >> 8
                value &= (1 << (8 * f.width)) - 1
                data = bytearray(frame.data)
                if f.offset + f.width <= len(data):
                    data[f.offset:f.offset + f.width] = value.to_bytes(f.width, f.order)  # type: ignore[arg-type]
                frames[i] = Frame(bytes(data), frame.fields)
        elif op == DROP and len(frames) > 1:
            del frames[a % len(frames)]
        elif op == REPEAT and frames:
            i = a % len(frames)
            frames[i:i] = [frames[i]] * (1 + b % 3)
        elif op == SWAP and len(frames) > 1:
            i, j = a % len(frames), b % len(frames)
            frames[i], frames[j] = frames[j], frames[i]
        elif op == SPLICE and pool:
            other = pool[a % len(pool)].frames
            if other:
                taken = other[b % len(other):][:1 + c % 3]
                at = c % (len(frames) + 1)
                frames[at:at] = list(taken)
    data = bytearray(b"".join(f.data for f in frames))
    for op, a, b, c in ops:
        n = len(data)
        if op == FLIP and n:
            data[a % n] ^= 1 << (b % 8)
        elif op == BYTE and n:
            data[a % n] = INTERESTING_BYTES[b % len(INTERESTING_BYTES)] if c % 2 else b % 256
        elif op == INT and n:
            width = (1, 2, 4, 8)[b % 4]
            at = a % n
            value = EXTREMES[c % len(EXTREMES)] & ((1 << (8 * width)) - 1)
            data[at:at + width] = value.to_bytes(width, "little" if c % 2 else "big")
        elif op == CUT and n:
            del data[a % (n + 1):]
        elif op == DELETE and n:
            at = a % n
            del data[at:at + 1 + b % 64]
        elif op == INSERT:
            at = a % (n + 1)
            rng = random.Random(c)
            data[at:at] = bytes(rng.getrandbits(8) for _ in range(1 + b % 32))
        elif op == TOKEN and dictionary:
            token = dictionary[b % len(dictionary)]
            at = a % (n + 1)
            if c % 2:
                data[at:at] = token
            else:
                data[at:at + len(token)] = token
        elif op == DUPLICATE and n:
            at = a % n
            piece = data[at:at + 1 + b % 256]
            data[at:at] = piece * (1 + c % 4)
        elif op == TAIL and n:
            at = a % n
            data[at:] = data[at:] + data[:at][-(1 + b % 64):]
        if len(data) > max_size:
            del data[max_size:]
    return bytes(data)


def random_ops(rng: random.Random, count: int | None = None) -> list[Op]:
    n = count
    if n is None:                       # 1 to 8, fewer more likely
        n = 1
        while n < 8 and rng.random() < 0.45:
            n += 1
    return [(rng.randrange(N_OPS), rng.getrandbits(32), rng.getrandbits(32),
             rng.getrandbits(32)) for _ in range(n)]


def random_input(rng: random.Random, max_size: int) -> bytes:
    return rng.randbytes(rng.randrange(min(max_size, 4096) + 1))


# -- drivers ------------------------------------------------------------------------------

class Hang(BaseException):
    """An input ran past the time limit (BaseException: no ``except Exception`` in the
    product can swallow it)."""


class Problems:
    """Failures the product did not raise but only reported: a log record with a
    traceback (an unexpected failure caught by a catch-all), an exception in a thread,
    a failed asyncio task nobody awaited."""

    def __init__(self) -> None:
        self.found: list[str] = []
        self._handler = _Collector(self)
        self._old_hook = threading.excepthook

    def install(self) -> None:
        logging.getLogger().addHandler(self._handler)
        threading.excepthook = self._thread_hook

    def uninstall(self) -> None:
        logging.getLogger().removeHandler(self._handler)
        threading.excepthook = self._old_hook

    def _thread_hook(self, args: threading.ExceptHookArgs) -> None:
        if args.exc_type is not None and issubclass(args.exc_type, Hang):
            return
        self.found.append(f"exception in thread {args.thread.name if args.thread else '?'}: "
                          + "".join(traceback.format_exception(args.exc_type, args.exc_value,
                                                               args.exc_traceback)))

    def asyncio_handler(self, loop, context: dict) -> None:
        exc = context.get("exception")
        if isinstance(exc, Hang):
            return
        text = context.get("message", "")
        if exc is not None:
            text += "\n" + "".join(traceback.format_exception(exc))
        self.found.append("asyncio: " + text)

    def take(self) -> list[str]:
        found, self.found = self.found, []
        return found


class _Collector(logging.Handler):
    def __init__(self, problems: Problems):
        super().__init__(logging.ERROR)
        self._problems = problems

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info and record.exc_info[0] is not None \
                and not issubclass(record.exc_info[0], Hang):
            self._problems.found.append(f"logged with a traceback: {record.getMessage()}\n"
                                        + "".join(traceback.format_exception(
                                            *record.exc_info)))


class Driver:
    """One parser under test. Subclasses set ``name``, ``allowed`` and ``dictionary``
    and implement ``seeds`` and ``run``."""

    name = ""
    what = ""                                  # one line for the report
    allowed: tuple[type[BaseException], ...] = ()
    dictionary: Sequence[bytes] = ()
    max_size = 64 * 1024                       # inputs are cut at this size
    time_limit = 2.0                           # seconds per input before it is a hang

    def __init__(self, workdir: str):
        self.workdir = workdir
        self._seeds: list[Seed] | None = None

    def seeds(self) -> list[Seed]:
        raise NotImplementedError

    def seed_list(self) -> list[Seed]:
        if self._seeds is None:
            self._seeds = self.seeds()
            assert self._seeds, f"{self.name}: no seeds"
        return self._seeds

    def run(self, data: bytes) -> str | None:
        """Feed one input; return None if it was accepted, raise an ``allowed`` error if
        not (or return what the refusal was, for a parser that answers instead of
        raising). Raise Violation when the parser accepted something it must not have."""
        raise NotImplementedError

    def close(self) -> None:
        pass


class Violation(AssertionError):
    """The parser returned, but what it made of the input breaks its contract."""


# -- running ------------------------------------------------------------------------------

@dataclass
class Outcome:
    kind: str                   # "accepted", "error", "crash", "hang"
    signature: str = ""         # the error class and message, numbers taken out
    detail: str = ""


_NUMBERS = re.compile(r"0x[0-9a-fA-F]+|[0-9a-f]{16,}|\d+")


def normalize(text: str) -> str:
    """An error message without its numbers and quoted values: one kind of error."""
    text = text.splitlines()[0] if text else ""
    text = _NUMBERS.sub("N", text)
    text = re.sub(r"b?'[^'\"]*'|b?\"[^'\"]*\"", "S", text)     # values the peer chose
    quoted = re.search(r"b?['\"]", text)         # one with quotes in it: where it starts
    if quoted:
        text = text[:quoted.start()] + "S..."
    return text[:100]


def signature(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {normalize(str(exc))}"


def _alarm(signum, frame):
    raise Hang("time limit")


def run_one(driver: Driver, data: bytes, problems: Problems) -> Outcome:
    """Feed ``data`` to ``driver`` under the time limit; classify what happened."""
    old = signal.signal(signal.SIGALRM, _alarm)
    started = time.monotonic()
    outer, _ = signal.setitimer(signal.ITIMER_REAL, driver.time_limit)
    try:
        try:
            refused = driver.run(data)
            outcome = Outcome("error", refused) if refused else Outcome("accepted")
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except Hang:
        outcome = Outcome("hang", "hang", traceback.format_exc())
    except driver.allowed as exc:
        outcome = Outcome("error", signature(exc))
    except KeyboardInterrupt:
        raise
    except BaseException as exc:    # everything else is what the fuzzer looks for
        outcome = Outcome("crash", "crash " + signature(exc), traceback.format_exc())
    finally:
        signal.signal(signal.SIGALRM, old)
        if outer:          # someone else's timer (pytest-timeout's): it goes on running
            signal.setitimer(signal.ITIMER_REAL,
                             max(0.001, outer - (time.monotonic() - started)))
    found = problems.take()
    if found and outcome.kind not in ("crash", "hang"):
        outcome = Outcome("crash", "crash (reported) " + found[0].splitlines()[0][:100],
                          "\n".join(found))
    return outcome


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


@dataclass
class Report:
    name: str
    inputs: int = 0
    accepted: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    crashes: list[str] = field(default_factory=list)     # reproducer paths
    crash_signatures: dict[str, int] = field(default_factory=dict)
    hangs: int = 0
    rss_start: int = 0
    rss_warm: int = 0            # after the first tenth of the run
    rss_end: int = 0
    rss_max: int = 0
    peak: int = 0
    seconds: float = 0.0
    samples: list[tuple[int, int]] = field(default_factory=list)   # (inputs, rss)
    seen: set[str] = field(default_factory=set)      # outcomes met so far

    def to_json(self) -> dict:
        return {"name": self.name, "inputs": self.inputs, "accepted": self.accepted,
                "distinct_errors": len(self.errors), "crashes": len(self.crashes),
                "crash_signatures": self.crash_signatures, "hangs": self.hangs,
                "reproducers": self.crashes, "rss_start": self.rss_start,
                "rss_warm": self.rss_warm, "rss_end": self.rss_end, "rss_max": self.rss_max,
                "peak_rss": self.peak, "seconds": round(self.seconds, 1),
                "errors": dict(sorted(self.errors.items(), key=lambda kv: -kv[1])[:40]),
                "rss_samples": self.samples}


def inputs(driver: Driver, rng: random.Random, corpus: list[Seed]) -> Iterable[bytes]:
    """Endless inputs: mutated seeds (and inputs kept for being new), some random."""
    seeds = driver.seed_list()
    for s in seeds:                          # every seed as it is, first
        yield s.data
    while True:
        roll = rng.random()
        if roll < 0.05:
            yield random_input(rng, driver.max_size)
            continue
        parents = corpus if corpus and roll < 0.35 else seeds
        parent = parents[rng.randrange(len(parents))]
        yield mutate(parent, random_ops(rng), seeds, driver.dictionary, driver.max_size)


MAX_CORPUS_BYTES = 4 << 20     # inputs kept for being new: the fuzzer's own memory stays small


def fuzz(driver: Driver, count: int, seed: int, crash_dir: str,
         progress: Callable[[Report], None] | None = None, sample_every: int = 1000,
         max_corpus: int = 2000) -> Report:
    """Run ``count`` inputs through ``driver``; reproducers of crashes and hangs go to
    ``crash_dir``/NAME/."""
    rng = random.Random(f"{driver.name}:{seed}")
    report = Report(driver.name)
    problems = Problems()
    problems.install()
    corpus: list[Seed] = []
    corpus_bytes = 0
    driver.seed_list()
    gc.collect()
    gc.freeze()          # what exists now (modules, seeds) is not scanned at every sample
    start = time.monotonic()
    report.rss_start = rss_bytes()
    try:
        for data in inputs(driver, rng, corpus):
            if report.inputs >= count:
                break
            outcome = run_one(driver, data, problems)
            report.inputs += 1
            if outcome.kind == "accepted":
                report.accepted += 1
                key = f"accepted, {len(data).bit_length()}-bit length"
            elif outcome.kind == "error":
                key = outcome.signature
                report.errors[key] = report.errors.get(key, 0) + 1
            else:
                key = outcome.signature
                if outcome.kind == "hang":
                    report.hangs += 1
                first = key not in report.crash_signatures
                report.crash_signatures[key] = report.crash_signatures.get(key, 0) + 1
                if first or len(report.crashes) < 50:
                    report.crashes.append(save_reproducer(crash_dir, driver.name, data,
                                                          outcome))
            if key not in report.seen and len(corpus) < max_corpus \
                    and corpus_bytes + len(data) <= MAX_CORPUS_BYTES:
                corpus.append(Seed((Frame(data),), key))     # new: worth mutating further
                corpus_bytes += len(data)
            report.seen.add(key)
            if report.inputs % sample_every == 0:
                gc.collect()          # garbage in reference cycles is not growth
                rss = rss_bytes()
                report.rss_max = max(report.rss_max, rss)
                if report.inputs == max(sample_every, count // 10 // sample_every
                                        * sample_every):
                    report.rss_warm = rss
                if report.inputs % (sample_every * 50) == 0 or report.inputs == sample_every:
                    report.samples.append((report.inputs, rss))
                if progress is not None:
                    report.seconds = time.monotonic() - start
                    progress(report)
    finally:
        gc.unfreeze()
        problems.uninstall()
        driver.close()
    report.seconds = time.monotonic() - start
    report.rss_end = rss_bytes()
    report.rss_max = max(report.rss_max, report.rss_end)
    report.rss_warm = report.rss_warm or report.rss_end
    report.peak = peak_rss_bytes()
    return report


def save_reproducer(crash_dir: str, name: str, data: bytes, outcome: Outcome) -> str:
    directory = os.path.join(crash_dir, name)
    os.makedirs(directory, exist_ok=True)
    digest = hashlib.sha1(data).hexdigest()[:16]
    path = os.path.join(directory, f"{outcome.kind}-{digest}.bin")
    with open(path, "wb") as f:
        f.write(data)
    with open(path[:-4] + ".txt", "w") as f:
        f.write(f"{outcome.signature}\n\n{outcome.detail}")
    return path


def check(driver: Driver, data: bytes) -> Outcome:
    """One input, for a test: the outcome, with the problems of this input only."""
    problems = Problems()
    problems.install()
    try:
        return run_one(driver, data, problems)
    finally:
        problems.uninstall()


def main_thread_only() -> None:
    if threading.current_thread() is not threading.main_thread():
        sys.exit("the fuzzer's time limit needs the main thread")
