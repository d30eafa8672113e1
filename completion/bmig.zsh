# The functions of bmig's zsh completion; generate.py puts _bmig_spec, the data of the
# commands, before them. The file is autoloaded as _bmigrate (#compdef above).

# The devices breqd tracks, asked of breqd at the --control socket given on the line
# (else BMIG_CONTROL, else the default); nothing if breqd does not answer in 2 s.
_bmig_devices() {
  local -a names control expl
  [[ -n ${opt_args[--control]} ]] && control=(--control ${(Q)opt_args[--control]})
  names=(${(f)"$(_call_program devices timeout ${BMIG_COMPLETION_TIMEOUT:-2} bmigrate track list ${(q)control} 2>/dev/null)"})
  _wanted devices expl 'tracked device' compadd -a names
}

# Complete the command path $1 ("bmigrate track"): its options and arguments, or its
# subcommands and then, recursively, the subcommand's.
_bmig_command() {
  local cmdpath=$1 curcontext=$curcontext state state_descr line ret=1
  local -a specs subs
  typeset -A opt_args
  _bmig_spec $cmdpath
  if (( $#subs )); then
    _arguments -C -s -S $specs ': :->command' '*:: :->arguments' && ret=0
    case $state in
      (command)
        _describe -t commands "${cmdpath##* } command" subs && ret=0 ;;
      (arguments)
        curcontext=${curcontext%:*:*}:${cmdpath// /-}-$words[1]:
        _bmig_command "$cmdpath $words[1]" && ret=0 ;;
    esac
  else
    _arguments -s -S $specs && ret=0
  fi
  return ret
}

_bmigrate() {
  _bmig_command $service
}

_bmigrate "$@"
