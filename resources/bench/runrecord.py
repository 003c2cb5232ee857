"""A benchmark's run record: finished runs kept in a JSON-lines file (first line: the arguments
they belong to) so that a benchmark cut short by a frozen or dead test host can be resumed by
the next one (resources/bench/resume.sh). Without a path nothing is kept."""
import json
import os
import sys


class RunRecord:
    def __init__(self, bench, path, params):
        self.path = path
        self.done = {}  # (round, name) -> entry
        if not path:
            return
        params = json.loads(json.dumps(params))  # as it reads back from the file
        lines = []
        try:
            with open(path) as f:
                text = [line for line in f if line.strip()]
            for i, line in enumerate(text):
                try:
                    lines.append(json.loads(line))
                except ValueError:
                    if i + 1 < len(text):
                        raise
                    # The last line of a test host that froze mid-write: that run is redone.
                    with open(path, "w") as f:
                        f.writelines(text[:-1])
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as e:
            sys.exit(f"{bench}: cannot read run record {path}: {e}")
        if not lines:
            with open(path, "w") as f:
                f.write(json.dumps({"params": params}) + "\n")
            return
        if lines[0].get("params") != params:
            sys.exit(f"{bench}: run record {path} belongs to a run with other arguments; "
                     "remove it or pass the same arguments")
        for e in lines[1:]:
            self.done[(e["round"], e["name"])] = e

    def record(self, rnd, name, entry):
        if not self.path:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"round": rnd, "name": name, **entry}) + "\n")
            f.flush()
            os.fsync(f.fileno())
