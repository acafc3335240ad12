// Command aqsh-kustomize renders a kustomization directory to stdout, as
// `kubectl kustomize DIR` does, so the deploy tests need no kubectl: a fresh
// machine with Go can build it from the module proxy (`make` does).
package main

import (
	"fmt"
	"os"

	"sigs.k8s.io/kustomize/api/krusty"
	"sigs.k8s.io/kustomize/kyaml/filesys"
)

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: aqsh-kustomize DIR")
		os.Exit(2)
	}
	if err := render(os.Args[1]); err != nil {
		fmt.Fprintln(os.Stderr, "aqsh-kustomize:", err)
		os.Exit(1)
	}
}

// render uses kustomize's default options (no plugins, no helm, files only
// from inside the kustomization root), as kubectl does, so what the tests see
// is what `kubectl apply -k` would send. One difference: the library's default
// keeps resources in input order, while kubectl (and the kustomize CLI) sort
// them (Namespaces and ConfigMaps before the Deployments that use them, unless
// a kustomization sets sortOptions); "unspecified" is that CLI behaviour.
func render(dir string) error {
	opts := krusty.MakeDefaultOptions()
	opts.Reorder = krusty.ReorderOptionUnspecified
	k := krusty.MakeKustomizer(opts)
	resMap, err := k.Run(filesys.MakeFsOnDisk(), dir)
	if err != nil {
		return err
	}
	out, err := resMap.AsYaml()
	if err != nil {
		return err
	}
	_, err = os.Stdout.Write(out)
	return err
}
