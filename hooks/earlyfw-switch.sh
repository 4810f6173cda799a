# earlyfw_off [TEXT]: succeeds when the kernel command line (TEXT, else
# /proc/cmdline) turns earlyfw off for this boot. Every loader earlyfw installs
# reads the switch through this one function, parsed as the kernel itself parses
# parameters (lib/cmdline.c next_arg, kernel/params.c parse_args): words split at
# unquoted white space, a double quote toggles quoting anywhere in a word, the
# quotes around a word or a value are dropped, nothing after a bare "--" is a
# kernel parameter, and the last earlyfw= wins: only "earlyfw=off" last is off.
# POSIX sh with no external command: it runs in busybox and dash initramfs too.
earlyfw_off() {
	if [ $# -eq 0 ]; then
		set -- ""
		while IFS= read -r earlyfw_line || [ -n "$earlyfw_line" ]; do
			set -- "$1$earlyfw_line "
		done </proc/cmdline 2>/dev/null
		unset earlyfw_line
	fi
	case $1 in
	*earlyfw*) ;;
	*) return 1 ;;
	esac
	# The kernel's isspace(): space, \t \n \v \f \r and Latin-1's 0xa0.
	earlyfw_ws=$(printf ' \t\n\v\f\r\240')
	earlyfw_rest=$1 earlyfw_value=on
	while :; do
		earlyfw_rest=${earlyfw_rest#"${earlyfw_rest%%[!"$earlyfw_ws"]*}"}
		[ -n "$earlyfw_rest" ] || break
		earlyfw_quoted=0 earlyfw_inquote=0 earlyfw_word=
		case $earlyfw_rest in
		'"'*) earlyfw_rest=${earlyfw_rest#?} earlyfw_quoted=1 earlyfw_inquote=1 ;;
		esac
		while :; do
			if [ "$earlyfw_inquote" = 1 ]; then
				earlyfw_chunk=${earlyfw_rest%%'"'*}
			else
				earlyfw_chunk=${earlyfw_rest%%["$earlyfw_ws"\"]*}
			fi
			earlyfw_word=$earlyfw_word$earlyfw_chunk
			earlyfw_rest=${earlyfw_rest#"$earlyfw_chunk"}
			case $earlyfw_rest in
			'') break ;;
			'"'*)
				earlyfw_word=$earlyfw_word'"' earlyfw_rest=${earlyfw_rest#?}
				earlyfw_inquote=$((1 - earlyfw_inquote))
				;;
			*)
				earlyfw_rest=${earlyfw_rest#?}
				break
				;;
			esac
		done
		# The name ends at the first '=' after the word's first character.
		earlyfw_tail=${earlyfw_word#?}
		case $earlyfw_tail in
		*=*)
			earlyfw_name=${earlyfw_word%"$earlyfw_tail"}${earlyfw_tail%%=*}
			earlyfw_val=${earlyfw_tail#*=}
			case $earlyfw_val in
			'"'*)
				earlyfw_val=${earlyfw_val#?}
				case $earlyfw_word in *'"') earlyfw_val=${earlyfw_val%'"'} ;; esac
				;;
			*) [ "$earlyfw_quoted" = 0 ] || earlyfw_val=${earlyfw_val%'"'} ;;
			esac
			[ "$earlyfw_name" != earlyfw ] || earlyfw_value=$earlyfw_val
			;;
		*)
			earlyfw_name=$earlyfw_word
			[ "$earlyfw_quoted" = 0 ] || earlyfw_name=${earlyfw_name%'"'}
			[ "$earlyfw_name" != -- ] || break
			[ "$earlyfw_name" != earlyfw ] || earlyfw_value=
			;;
		esac
	done
	set -- "$earlyfw_value"
	unset earlyfw_ws earlyfw_rest earlyfw_value earlyfw_quoted earlyfw_inquote earlyfw_word earlyfw_chunk \
		earlyfw_tail earlyfw_name earlyfw_val
	[ "$1" = off ]
}
