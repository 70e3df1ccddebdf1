"""The 8 prompts every throughput benchmark sends (bench_batching.py, bench_peers.py), so their figures compare."""

PROMPTS = [
    "Write a story about a lighthouse keeper.",
    "Explain how a refrigerator works.",
    "Describe a walk through a forest in autumn.",
    "Write a letter to a friend about your holiday.",
    "Explain the rules of chess to a beginner.",
    "Describe the history of the bicycle.",
    "Write a poem about the city at night.",
    "Explain why the sky is blue.",
]
