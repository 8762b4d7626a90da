#compdef diffgen

_diffgen_completion() {
  eval $(env _TYPER_COMPLETE_ARGS="${words[1,$CURRENT]}" _DIFFGEN_COMPLETE=complete_zsh diffgen)
}

compdef _diffgen_completion diffgen
