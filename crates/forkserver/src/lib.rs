//! multiproc-forkserver: the `forkserver` start method (in progress, see issue 3).
