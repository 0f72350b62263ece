import cProfile, pstats, io
def prof(comm):
    from tests import zero_cases
    pr = cProfile.Profile(); pr.enable()
    zero_cases.equivalence(comm)
    pr.disable()
    s = io.StringIO(); pstats.Stats(pr, stream=s).sort_stats("cumulative").print_stats(45)
    return s.getvalue() if comm.rank == 0 else None
