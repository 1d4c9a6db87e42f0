
#compdef loraxs

_loraxs_completion() {
  eval $(env _TYPER_COMPLETE_ARGS="${words[1,$CURRENT]}" _LORAXS_COMPLETE=complete_zsh loraxs)
}

compdef _loraxs_completion loraxs

