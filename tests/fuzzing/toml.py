"""Driver for every TOML file kind: breqd's settings, breceive's, bmig-nbd's, a migration
file and a device definition, each read by its loader and used as its program uses it
(the loaders of tests/unit/test_config_fuzz.py). The first byte of an input chooses the
kind; the rest is the file."""

from __future__ import annotations

import os

from bmig.errors import ConfigError
from tests.fuzzing.engine import Driver, Seed, seed
from tests.unit import test_config_fuzz as config_fuzz

KINDS = tuple(config_fuzz.KINDS)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLES = {"breqd": "breqd.toml", "breceive": "breceive.toml"}

TOML_TOKENS = [b"\nmax_sessions = ", b"\n[targets.vm1]\n", b'\npath = "/tmp/x"\n',
               b"\n[[export]]\n", b'\ndevice = "vm1"\n', b'\nbacking = "/tmp/b"\n', b"1e400",
               b"inf", b"nan", b"-0", b"0x7fffffffffffffff", b"99999999999999999999",
               b"1979-05-27T07:32:00Z", b"true", b'"64K"', b'"0600"', b'"abc"', b"[]",
               b"{}", b"a.b.c.d = 1", b'"\\u0000"', b"'''", b'"""', b"[[[[[[[[", b"= { x = { y = 1 } }",
               b'\nlisten = ["127.0.0.1:0"]\n', b'\nsize = "16M"\n', b"\nchunk_size = 3\n",
               b'\nto = "ssh://h/vm1"\n', b"\nwindow = 0\n", b'\nsocket_mode = "0777"\n']


class Toml(Driver):
    name = "toml"
    what = "every TOML file kind through its loader (bmig/config.py and the CLI schemas)"
    allowed = (ConfigError,)
    dictionary = TOML_TOKENS
    max_size = 16 * 1024

    def __init__(self, workdir: str):
        super().__init__(workdir)
        self.dir = os.path.join(workdir, "toml")
        os.makedirs(self.dir, exist_ok=True)

    def seeds(self) -> list[Seed]:
        out = []
        for i, kind in enumerate(KINDS):
            text = config_fuzz.toml_document(config_fuzz.VALID[kind]).encode()
            out.append(seed(f"{kind}-valid", bytes([i]), text))
            if kind in EXAMPLES:
                with open(os.path.join(ROOT, "daemons", "examples", EXAMPLES[kind]), "rb") as f:
                    out.append(seed(f"{kind}-example", bytes([i]), f.read()))
        return out

    def run(self, data: bytes) -> None:
        kind = KINDS[data[0] % len(KINDS)] if data else KINDS[0]
        load, _ = config_fuzz.KINDS[kind]
        path = os.path.join(self.dir, f"{kind}.toml")
        with open(path, "wb") as f:
            f.write(data[1:])
        event = config_fuzz.event
        config_fuzz.event = lambda *args, **kwargs: None     # hypothesis's, outside a test
        try:
            load(path)
        except ConfigError as exc:
            if "\n" in exc.message:
                raise AssertionError(f"a ConfigError of more than one line: {exc.message!r}")
            raise
        finally:
            config_fuzz.event = event
            os.unlink(path)


DRIVERS = (Toml,)
