"""What a job will do and whether it can: the work list (:mod:`.work`), the checks, the
report behind ``mergejob plan`` (:mod:`.report`) and its cost model."""
