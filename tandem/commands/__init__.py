"""One module per ``tandem`` command group; each imports its stage package inside commands."""
