//go:build tools

// Package tools pins kwok's main package so `go mod tidy` keeps its
// dependencies in go.mod and go.sum.
package tools

import (
	_ "sigs.k8s.io/kwok/cmd/kwok"
)
