"""What bash and zsh offer when TAB is pressed, with bmig's completion loaded the way
each shell loads it: bash-completion's loader finds the file by command name in
XDG_DATA_DIRS; zsh's compinit finds _bmigrate in fpath."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

BASH_COMPLETION = Path("/usr/share/bash-completion/bash_completion")
ZSH_HARNESS = Path(__file__).resolve().parent / "zsh_complete.zsh"
TIMEOUT = 60

# Loads bash-completion, has its loader load the completion of the line's command from
# $1/bash-completion/completions, then completes the line $2 at its end as readline would.
_BASH = r"""
source /usr/share/bash-completion/bash_completion || exit 2
XDG_DATA_DIRS=$1 BASH_COMPLETION_USER_DIR=/nonexistent
COMP_LINE=$2
COMP_POINT=${#COMP_LINE}
read -r -a COMP_WORDS <<<"$COMP_LINE"
[[ $COMP_LINE == *" " ]] && COMP_WORDS+=("")
COMP_CWORD=$((${#COMP_WORDS[@]} - 1))
__load_completion "${COMP_WORDS[0]}" || { echo "no completion loaded" >&2; exit 3; }
spec=$(complete -p "${COMP_WORDS[0]}") || exit 3
function=${spec#*-F }
function=${function%% *}
"$function" "${COMP_WORDS[0]}" "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD-1]}"
printf '%s\n' "${COMPREPLY[@]}"
"""


def have_bash_completion() -> bool:
    return BASH_COMPLETION.exists() and shutil.which("bash") is not None


def have_zsh() -> bool:
    return shutil.which("zsh") is not None


def _run(argv: list[str], env: dict[str, str]) -> list[str]:
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, f"{argv[:3]}... exited {done.returncode}:\n{done.stderr}"
    return sorted(line for line in done.stdout.splitlines() if line)


def bash_complete(share: str, line: str, env: dict[str, str]) -> list[str]:
    """The completions bash offers at the end of ``line``; ``share`` holds
    bash-completion/completions/COMMAND."""
    return _run(["bash", "--norc", "--noprofile", "-c", _BASH, "bash", share, line], env)


def zsh_complete(fpath: str, line: str, env: dict[str, str]) -> list[str]:
    """The completions zsh offers at the end of ``line``; ``fpath`` holds _bmigrate."""
    return _run(["zsh", "-f", str(ZSH_HARNESS), fpath, line], env)
