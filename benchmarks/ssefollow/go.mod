module github.com/aqsh/aqsh/benchmarks/ssefollow

go 1.24.0
