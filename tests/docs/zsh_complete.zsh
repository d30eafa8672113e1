# What zsh offers when TAB is pressed at the end of a line, one match per line.
#   zsh -f zsh_complete.zsh DIR LINE
# DIR goes first in fpath. An interactive zsh on a pseudo-terminal (zpty) runs compinit
# and the completion; compadd is wrapped to print every match it is given (after the
# matching against the line) between markers, and the shell exits after the completion.
zmodload zsh/zpty || { print -u2 "zsh_complete: no zsh/zpty"; exit 2 }
zpty z zsh -f -i || exit 2
zpty -w z "PS1= PS2= RPS1= PROMPT_EOL_MARK="
zpty -w z "fpath=(${(q)1} \$fpath)"
zpty -w z "autoload -Uz compinit && compinit -u -D"
zpty -w z "zstyle ':completion:*' insert-tab false"
zpty -w z "bindkey '^I' complete-word"
zpty -w z 'compadd() {
  if [[ ${@[1,(i)(-|--)]} == *-(O|A|D)\ * ]]; then builtin compadd "$@"; return; fi
  local -a __hits; builtin compadd -O __hits "$@"
  local h; for h in $__hits; do print -r -- "<<mat""ch>>$h<<e""nd>>"; done
  builtin compadd "$@"
}'
zpty -w z '_zc_finish() { print -r -- "<<do""ne>>"; exit 0 }'
zpty -w z 'comppostfuncs=(_zc_finish)'
zpty -w z "print -r -- '<<rea''dy>>'"
zpty -w -n z "$2"$'\t'
local out line
while zpty -r z line; do
  out+=$line
  [[ $line == *'<<done>>'* ]] && break
done
zpty -d z
out=${out#*<<ready>>}
local -a found
found=(${(f)"$(print -r -- $out | grep -ao '<<match>>.*<<end>>')"})
for line in $found; do line=${line#<<match>>}; print -r -- ${line%%<<end>>*}; done
