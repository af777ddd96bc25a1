"""A dependency-free progress bar: redraws in place on a terminal, prints ~10 lines otherwise."""
import sys
import time


class Progress:
    def __init__(self, total: int, desc: str, stream=None):
        self.total, self.desc, self.stream = total, desc, stream or sys.stderr
        self.tty = getattr(self.stream, "isatty", lambda: False)()
        self.start = time.perf_counter()
        self.last_print = -1

    def update(self, done: int, **fields) -> None:
        bucket = done * 10 // max(1, self.total)
        if not self.tty and bucket == self.last_print and done != self.total:
            return
        self.last_print = bucket
        width = 24
        filled = width * done // max(1, self.total)
        info = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items())
        line = f"{self.desc} [{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} {info}"
        if self.tty:
            self.stream.write("\r" + line + ("\n" if done == self.total else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start
