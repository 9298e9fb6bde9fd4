"""Study collection as library code: intervals and verdicts (``intervals``), MABN's successors
beside the Fashion-MNIST study (``successors``). ``scripts/`` holds the command lines."""
