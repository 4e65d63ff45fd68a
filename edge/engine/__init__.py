"""One loaded model, two roles: grammar-constrained sentiment and streamed chat."""
