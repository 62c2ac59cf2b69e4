"""The user-facing commands (generate, chat, bench, convert, distill): clients of the core.

They parse, print and pick defaults; every decision about decoding (draft lengths, caches,
dtypes, drafter resolution, the drafter's forward pass) lives in the core beside this package.
"""
