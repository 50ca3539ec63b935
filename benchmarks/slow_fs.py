"""A stand-in for a network file system: a folder mounted through FUSE with a fixed delay added to every request
(lookup, getattr, open, read, write, ...), as each is a round trip to a file server on NFS, SMB or Lustre.

    pip install fusepy        # and the system's FUSE (Debian: apt-get install fuse3 libfuse2)
    python benchmarks/slow_fs.py FOLDER MOUNTPOINT --delay-ms 1 &
    python benchmarks/bench_resume.py --folder MOUNTPOINT --files 2000
    fusermount -u MOUNTPOINT

Everything under MOUNTPOINT is FOLDER's, each request answered after ``--delay-ms``. Requests are served by
threads, so requests made at once wait at once, as on a real server. The server is Python: on a small machine its
own CPU time, shared with the process measured, bounds what the mount can serve (about 1 ms per small file read on
the 2-core test machine with no delay). A measure, not a test: the suite does not need FUSE.
"""

from __future__ import annotations

import argparse
import os
import time

from fuse import FUSE, FuseOSError, Operations  # fusepy

STAT_FIELDS = ("st_atime", "st_ctime", "st_gid", "st_mode", "st_mtime", "st_nlink", "st_size", "st_uid")
STATVFS_FIELDS = ("f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail", "f_ffree", "f_files", "f_flag",
                  "f_frsize", "f_namemax")  # fmt: skip


class SlowPassthrough(Operations):
    def __init__(self, root: str, delay: float):
        self.root, self.delay = os.path.realpath(root), delay

    def __call__(self, op, path, *args):
        time.sleep(self.delay)
        try:
            return super().__call__(op, path, *args)
        except OSError as e:
            raise FuseOSError(e.errno) from None

    def _path(self, path: str) -> str:
        return os.path.join(self.root, path.lstrip("/"))

    def getattr(self, path, fh=None):
        st = os.lstat(self._path(path))
        return {key: getattr(st, key) for key in STAT_FIELDS}

    def readdir(self, path, fh):
        return [".", "..", *os.listdir(self._path(path))]

    def open(self, path, flags):
        return os.open(self._path(path), flags)

    def create(self, path, mode, fi=None):
        return os.open(self._path(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)

    def read(self, path, size, offset, fh):
        return os.pread(fh, size, offset)

    def write(self, path, data, offset, fh):
        return os.pwrite(fh, data, offset)

    def truncate(self, path, length, fh=None):
        os.truncate(self._path(path), length)

    def flush(self, path, fh):
        return 0

    def fsync(self, path, datasync, fh):
        os.fsync(fh)
        return 0

    def release(self, path, fh):
        os.close(fh)

    def unlink(self, path):
        os.unlink(self._path(path))

    def rename(self, old, new):
        os.rename(self._path(old), self._path(new))

    def mkdir(self, path, mode):
        os.mkdir(self._path(path), mode)

    def rmdir(self, path):
        os.rmdir(self._path(path))

    def chmod(self, path, mode):
        os.chmod(self._path(path), mode)

    def utimens(self, path, times=None):
        os.utime(self._path(path), times)

    def statfs(self, path):
        st = os.statvfs(self._path(path))
        return {key: getattr(st, key) for key in STATVFS_FIELDS}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder")
    p.add_argument("mountpoint")
    p.add_argument("--delay-ms", type=float, default=1.0, help="added to every request (default 1)")
    args = p.parse_args()
    FUSE(SlowPassthrough(args.folder, args.delay_ms / 1000), args.mountpoint, foreground=True, nothreads=False)


if __name__ == "__main__":
    main()
