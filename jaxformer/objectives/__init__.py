"""Training objectives: batch transforms and the weighted cross-entropy loss."""
