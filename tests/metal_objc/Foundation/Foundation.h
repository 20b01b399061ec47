/*
 * The few declarations of Foundation (and the Objective-C runtime under it) that
 * csrc/backend/metal/metal_host.m uses, for a syntax check on Linux (tests/test_metal_host.py): not
 * Apple's header. Each name and type is as Apple's SDK declares it for arm64 macOS (LP64: NSInteger is
 * long; BOOL is bool on arm64); Apple's macros are spelled out (NS_ASSUME_NONNULL_BEGIN as the clang
 * pragma, NS_RETURNS_INNER_POINTER as its attribute). Add a declaration only for a call metal_host.m
 * makes, copied from Apple's documentation, and say where it was checked (tests/metal_objc/README.md).
 */
#ifndef FM_TEST_FOUNDATION_H
#define FM_TEST_FOUNDATION_H

#include <stdbool.h>
#include <stdint.h>

#pragma clang assume_nonnull begin

/* <sys/cdefs.h> (Darwin's libc spells nullability this way) */
#ifndef __nullable
#define __nullable _Nullable
#endif

/* <objc/objc.h>, arm64: OBJC_BOOL_IS_BOOL; nil is __DARWIN_NULL */
typedef bool BOOL;
#define YES __objc_yes
#define NO __objc_no
#ifndef nil
#define nil ((void *)0)
#endif

/* <objc/NSObjCRuntime.h>, LP64 */
typedef long NSInteger;
typedef unsigned long NSUInteger;

#define NS_RETURNS_INNER_POINTER __attribute__((objc_returns_inner_pointer))

@protocol NSObject
@end

__attribute__((objc_root_class))
@interface NSObject <NSObject>
+ (instancetype)new;
+ (instancetype)alloc;
- (instancetype)init;
@end

@protocol NSCopying
@end

/* NSString.h */
@interface NSString : NSObject
@property (nullable, readonly) const char *UTF8String NS_RETURNS_INNER_POINTER;
+ (nullable instancetype)stringWithUTF8String:(const char *)nullTerminatedCString;
@end

/* NSError.h */
@interface NSError : NSObject
@property (readonly, copy) NSString *localizedDescription;
@end

#pragma clang assume_nonnull end

#endif
