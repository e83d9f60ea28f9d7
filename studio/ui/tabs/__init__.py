"""One module per studio tab, each exposing `build_<name>_tab(studio, pickers)`."""
