# The functions of bmig's bash completion; generate.py puts the data of the commands
# (_bmig_subs, _bmig_opts, _bmig_value, _bmig_args) before them. bash-completion loads
# the file by command name and provides _init_completion and _filedir.

# The devices breqd tracks, one per line; nothing if breqd does not answer in 2 s.
# $1: the --control socket given on the line, if any (else BMIG_CONTROL, else the default).
_bmig_devices()
{
    local -a control=()
    [[ -n $1 ]] && control=(--control "$1")
    timeout "${BMIG_COMPLETION_TIMEOUT:-2}" bmigrate track list "${control[@]}" 2>/dev/null
}

# Complete $cur as a value of kind $1 (@file, @dir, @device, @text or a|b|c choices);
# $2: the --control socket given on the line.
_bmig_complete_value()
{
    case $1 in
        @file) _filedir ;;
        @dir) _filedir -d ;;
        @device) mapfile -t COMPREPLY < <(compgen -W "$(_bmig_devices "$2")" -- "$cur") ;;
        @text) ;;
        *) mapfile -t COMPREPLY < <(compgen -W "${1//|/ }" -- "$cur") ;;
    esac
    # A word with ":" is one word here (HOST:PORT) but several for readline.
    __ltrim_colon_completions "$cur"
}

_bmig_complete()
{
    local cur prev words cword split
    _init_completion -s -n : || return

    # Walk the words before the cursor: a subcommand descends (before any argument), an
    # option that takes a value skips it, anything else is the next argument.
    local cmdpath=${words[0]##*/} word control="" i arguments=0
    for ((i = 1; i < cword; i++)); do
        word=${words[i]}
        if [[ $word == -* ]]; then
            if [[ $word == --control=* ]]; then
                control=${word#*=}
            elif [[ $word != *=* && -n ${_bmig_value["$cmdpath $word"]+set} ]]; then
                ((i++))
                [[ $word == --control ]] && control=${words[i]}
            fi
        elif ((arguments == 0)) && [[ " ${_bmig_subs[$cmdpath]-} " == *" $word "* ]]; then
            cmdpath+=" $word"
        else
            ((arguments++))
        fi
    done

    if [[ -n ${_bmig_value["$cmdpath $prev"]+set} ]]; then
        _bmig_complete_value "${_bmig_value["$cmdpath $prev"]}" "$control"
        return
    fi
    $split && return
    if [[ $cur == -* ]]; then
        mapfile -t COMPREPLY < <(compgen -W "${_bmig_opts[$cmdpath]-}" -- "$cur")
        return
    fi
    if ((arguments == 0)) && [[ -n ${_bmig_subs[$cmdpath]-} ]]; then
        mapfile -t COMPREPLY < <(compgen -W "${_bmig_subs[$cmdpath]}" -- "$cur")
        return
    fi
    local -a kinds
    read -r -a kinds <<<"${_bmig_args[$cmdpath]-}"
    if ((arguments < ${#kinds[@]})) && [[ ${kinds[arguments]} != ... ]]; then
        _bmig_complete_value "${kinds[arguments]}" "$control"
    elif ((${#kinds[@]} > 1)) && [[ ${kinds[-1]} == ... ]]; then
        _bmig_complete_value "${kinds[-2]}" "$control"
    fi
}
