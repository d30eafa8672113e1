"""The cipher order SSH gets when the user chose none (bmig.wire.ssh.ciphers): AES-GCM
first, only where the CPU has AES instructions, never a cipher the client would not offer."""

from __future__ import annotations

from bmig.wire.ssh.ciphers import aes_in_hardware, configured_ciphers, gcm_first

OPENSSH_DEFAULT = ["chacha20-poly1305@openssh.com", "aes128-ctr", "aes192-ctr", "aes256-ctr",
                   "aes128-gcm@openssh.com", "aes256-gcm@openssh.com"]


def test_gcm_first_only_reorders():
    assert gcm_first(OPENSSH_DEFAULT) == [
        "aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "chacha20-poly1305@openssh.com",
        "aes128-ctr", "aes192-ctr", "aes256-ctr"]
    restricted = ["chacha20-poly1305@openssh.com", "aes256-ctr"]
    assert gcm_first(restricted) == restricted          # nothing added
    assert gcm_first(["aes256-gcm@openssh.com", "aes128-ctr", "aes128-gcm@openssh.com"]) == [
        "aes256-gcm@openssh.com", "aes128-gcm@openssh.com", "aes128-ctr"]


def test_the_ciphers_line_of_ssh_g():
    text = "user root\nhostname h\nciphers " + ",".join(OPENSSH_DEFAULT) + "\nport 22\n"
    assert configured_ciphers(text) == OPENSSH_DEFAULT
    assert configured_ciphers("user root\nport 22\n") is None


def cpuinfo(tmp_path, name: str, text: str) -> str:
    path = tmp_path / name          # a file per case: the answer is cached per path
    path.write_text(text)
    return str(path)


def test_aes_in_hardware_needs_aes_and_carry_less_multiply(tmp_path):
    assert aes_in_hardware(cpuinfo(tmp_path, "x86", "processor\t: 0\n"
                                   "flags\t\t: fpu sse2 aes pclmulqdq avx\n"))
    assert aes_in_hardware(cpuinfo(tmp_path, "arm64", "processor\t: 0\n"
                                   "Features\t: fp asimd aes pmull sha1\n"))
    assert not aes_in_hardware(cpuinfo(tmp_path, "no-aes", "flags\t\t: fpu sse2 pclmulqdq\n"))
    assert not aes_in_hardware(cpuinfo(tmp_path, "no-clmul", "flags\t\t: fpu sse2 aes\n"))
    assert not aes_in_hardware(str(tmp_path / "missing"))
