"""mlx-lm's spellings next to ours: a model (or adapter folder) given positionally or by flag."""

import typer


def usage_error(message: str):
    """`error: message` on stderr, exit status 2 (as every command's bad input)."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def positional_or_flag(positional, flag_value, flag: str, what: str):
    """The value given as the positional argument `what` or as `flag` (mlx-lm's spelling, e.g.
    --model); a usage error when neither is given or the two differ."""
    if positional is not None and flag_value is not None and positional != flag_value:
        usage_error(f"{what} given twice, as {positional!r} and {flag} {flag_value!r}; give one "
                    "of them")
    value = positional if positional is not None else flag_value
    if value is None:
        usage_error(f"missing {what}: give it as the first argument or with {flag}")
    return value
