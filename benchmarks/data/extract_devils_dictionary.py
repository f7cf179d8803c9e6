"""Rebuild benchmarks/data/devils_dictionary.txt from Debian's dict-devil package (see README.md here).

    apt-get download dict-devil            # dict-devil_1.0-13.1_all.deb
    dpkg -x dict-devil_1.0-13.1_all.deb x
    python3 benchmarks/data/extract_devils_dictionary.py x/usr/share/dictd/devil.dict.dz benchmarks/data/devils_dictionary.txt

The dictd file is the book's text with the package's own entries around it: the dictfmt header and the
database description (Debian's and the Internet Wiretap edition's notice) before the PREFACE, and the
alphabet entry at the end; dictfmt also marks five cross references as {WORD}. This keeps the book from its
PREFACE to its last entry (ZOOLOGY), drops the braces and trailing spaces, and writes plain UTF-8 (the text is
ASCII).
"""
import gzip
import hashlib
import sys


def extract(raw: str) -> str:
    lines = raw.split("\n")
    start = next(i for i, line in enumerate(lines) if line.strip() == "PREFACE")
    end = len(lines)
    while lines[end - 1].strip() in ("", "abcdefghijklmnopqrstuvwxyz"):
        end -= 1
    body = "\n".join(line.rstrip() for line in lines[start:end]).replace("{", "").replace("}", "") + "\n"
    return body.lstrip(" ")


if __name__ == "__main__":
    src, dst = sys.argv[1:3]
    with gzip.open(src, "rt", encoding="ascii") as fh:
        text = extract(fh.read())
    data = text.encode("utf-8")
    with open(dst, "wb") as fh:
        fh.write(data)
    print(dst, len(data), "bytes, sha256", hashlib.sha256(data).hexdigest())
