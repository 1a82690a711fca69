"""Generation backends. ``local`` runs batched greedy decoding on a loaded model."""
