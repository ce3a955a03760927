"""What people touch: the command line (cli), the paper report (report), the circuit report
and plots. The only layer that parses arguments or prints."""
