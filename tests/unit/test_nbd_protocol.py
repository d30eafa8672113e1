"""NBD constants: values as proto.md has them, layouts of the right size, printable names."""

from bmig.nbd import protocol as p


def test_magics_spell_their_names():
    assert p.NBDMAGIC.to_bytes(8, "big") == b"NBDMAGIC"
    assert p.IHAVEOPT.to_bytes(8, "big") == b"IHAVEOPT"


def test_header_sizes_match_the_spec():
    assert p.SERVER_GREETING.size == 18
    assert p.OPTION_HEADER.size == 16
    assert p.OPTION_REPLY.size == 20
    assert p.REQUEST.size == 28
    assert p.SIMPLE_REPLY.size == 16
    assert p.STRUCTURED_REPLY.size == 20


def test_error_replies_have_the_top_bit_set():
    assert all(r >= 1 << 31 for r in p.Rep if r.name.startswith("ERR_"))
    assert all(r < 1 << 31 for r in p.Rep if not r.name.startswith("ERR_"))


def test_names_are_printable_for_known_and_unknown_values():
    assert p.name(p.Cmd, 1) == "NBD_CMD_WRITE"
    assert p.name(p.Opt, 7) == "NBD_OPT_GO"
    assert p.name(p.Err, 28) == "NBD_ENOSPC"
    assert p.name(p.Cmd, 99) == "NBD_CMD_0x63"


def test_every_command_with_a_handler_declares_its_flags():
    for cmd in (p.Cmd.READ, p.Cmd.WRITE, p.Cmd.FLUSH, p.Cmd.TRIM, p.Cmd.WRITE_ZEROES,
                p.Cmd.BLOCK_STATUS, p.Cmd.DISC):
        assert cmd in p.ALLOWED_CMD_FLAGS


def test_limits_hold_against_each_other():
    assert p.MAX_PAYLOAD <= p.MAX_DISCARD
    assert p.MAX_PAYLOAD <= p.MAX_INFLIGHT_BYTES
    assert p.MAX_NAME_LENGTH <= p.MAX_OPTION_LENGTH
    assert p.PREFERRED_BLOCK_SIZE <= p.MAX_PAYLOAD
