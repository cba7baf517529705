"""Results: the typed record (:mod:`.record`), the run store (:mod:`.store`) and run keys (:mod:`.keys`)."""
