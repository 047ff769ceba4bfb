"""Write xor.csv beside this file: the four XOR points, each repeated 100 times with a little
Gaussian noise (sd 0.1), shuffled; columns x1, x2, label. Run once; the seed fixes the file.

    python search_spaces/data/make_xor.py
"""

from pathlib import Path

import numpy as np

CORNERS = [((0.0, 0.0), 0), ((0.0, 1.0), 1), ((1.0, 0.0), 1), ((1.0, 1.0), 0)]
REPEATS = 100
NOISE_SD = 0.1
SEED = 0


def main() -> None:
    rng = np.random.default_rng(SEED)
    rows = [(x1, x2, label) for (x1, x2), label in CORNERS for _ in range(REPEATS)]
    points = np.array([r[:2] for r in rows]) + rng.normal(0.0, NOISE_SD, (len(rows), 2))
    labels = np.array([r[2] for r in rows])
    order = rng.permutation(len(rows))
    lines = ["x1,x2,label"]
    shuffled = zip(points[order], labels[order], strict=True)
    lines += [f"{x1:.4f},{x2:.4f},{y}" for (x1, x2), y in shuffled]
    (Path(__file__).parent / "xor.csv").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
