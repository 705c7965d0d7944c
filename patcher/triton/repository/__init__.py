"""The Triton model repository: what each model of an entry is (builders), its config.pbtxt (configs), and the
all-or-nothing publish of a new version (writer, publish). Imports no torch."""
