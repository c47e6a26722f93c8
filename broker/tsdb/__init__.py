"""The OpenTSDB/HiTSDB door's model (shared/spec/tsdb-put.md): points, series and queries over the log."""
